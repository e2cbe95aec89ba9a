"""Unit tests of console_listing.py's reading of the test's output and its report.

    python3 -m unittest discover -s benchmarks -p 'test_*.py'
"""

import unittest

import console_listing

LINE = ('{"n":100000,"round":%d,"quiet_max_us":%f,"quiet_p999_us":1.0,"quiet_waits_per_1k":0.0,'
        '"listing_max_us":40.0,"listing_p999_us":2.0,"listing_waits_per_1k":0.5,"listings":30,'
        '"list_ms_median":45.0}')


class Rounds(unittest.TestCase):
    def test_only_the_rounds_are_read(self):
        out = "running 1 test\n" + LINE % (0, 10.0) + "\n" + LINE % (1, 30.0) + "\ntest result: ok.\n"
        rounds = console_listing.parse_rounds(out)
        self.assertEqual([r["round"] for r in rounds], [0, 1])

    def test_no_round_is_not_a_measurement(self):
        with self.assertRaisesRegex(ValueError, "printed no round"):
            console_listing.parse_rounds("running 0 tests\ntest result: ok. 0 passed\n")

    def test_medians_with_lowest_and_highest(self):
        rounds = console_listing.parse_rounds("\n".join(LINE % (i, x) for i, x in enumerate([5.0, 9.0, 7.0])))
        self.assertEqual(console_listing.summary(rounds)["quiet_max_us"], (7.0, 5.0, 9.0))
        text = console_listing.report({"connections": 100000, "when": "now", "rounds": rounds})
        self.assertIn("| slowest step, no listing (µs) | 7.0 | 5.0 | 9.0 |", text)


if __name__ == "__main__":
    unittest.main()
