//! The tests of `udp::quic`: the RFC 9001 and RFC 9369 sample packets, Initials built here with the
//! client's keys (an encryption round trip), reassembly, and inputs that must fail without panics.

use super::*;

/// The DCID of the sample client Initials (RFC 9001 A, RFC 9369 A).
const SAMPLE_DCID: &str = "8394c8f03e515708";

/// The plaintext payload of both sample client Initials before its PADDING (RFC 9001 A.2, RFC
/// 9369 A.2): one CRYPTO frame holding a ClientHello for `example.com` with ALPN `alpn`.
const SAMPLE_CRYPTO_FRAME: &str = concat!(
    "060040f1010000ed0303ebf8fa56f12939b9584a3896472ec40bb863cfd3e868",
    "04fe3a47f06a2b69484c00000413011302010000c000000010000e00000b6578",
    "616d706c652e636f6dff01000100000a00080006001d00170018001000070005",
    "04616c706e000500050100000000003300260024001d00209370b2c9caa47fba",
    "baf4559fedba753de171fa71f50f1ce15d43e994ec74d748002b000302030400",
    "0d0010000e0403050306030203080408050806002d00020101001c0002400100",
    "3900320408ffffffffffffffff05048000ffff07048000ffff08011001048000",
    "75300901100f088394c8f03e51570806048000ffff",
);
/// The payload is padded with zeros to this length.
const SAMPLE_PAYLOAD_LEN: usize = 1162;

/// RFC 9001 A.2: the protected client Initial, version 1 (packet number 2, 1200 bytes).
const RFC9001_CLIENT_INITIAL: &str = concat!(
    "c000000001088394c8f03e5157080000449e7b9aec34d1b1c98dd7689fb8ec11",
    "d242b123dc9bd8bab936b47d92ec356c0bab7df5976d27cd449f63300099f399",
    "1c260ec4c60d17b31f8429157bb35a1282a643a8d2262cad67500cadb8e7378c",
    "8eb7539ec4d4905fed1bee1fc8aafba17c750e2c7ace01e6005f80fcb7df6212",
    "30c83711b39343fa028cea7f7fb5ff89eac2308249a02252155e2347b63d58c5",
    "457afd84d05dfffdb20392844ae812154682e9cf012f9021a6f0be17ddd0c208",
    "4dce25ff9b06cde535d0f920a2db1bf362c23e596d11a4f5a6cf3948838a3aec",
    "4e15daf8500a6ef69ec4e3feb6b1d98e610ac8b7ec3faf6ad760b7bad1db4ba3",
    "485e8a94dc250ae3fdb41ed15fb6a8e5eba0fc3dd60bc8e30c5c4287e53805db",
    "059ae0648db2f64264ed5e39be2e20d82df566da8dd5998ccabdae053060ae6c",
    "7b4378e846d29f37ed7b4ea9ec5d82e7961b7f25a9323851f681d582363aa5f8",
    "9937f5a67258bf63ad6f1a0b1d96dbd4faddfcefc5266ba6611722395c906556",
    "be52afe3f565636ad1b17d508b73d8743eeb524be22b3dcbc2c7468d54119c74",
    "68449a13d8e3b95811a198f3491de3e7fe942b330407abf82a4ed7c1b311663a",
    "c69890f4157015853d91e923037c227a33cdd5ec281ca3f79c44546b9d90ca00",
    "f064c99e3dd97911d39fe9c5d0b23a229a234cb36186c4819e8b9c5927726632",
    "291d6a418211cc2962e20fe47feb3edf330f2c603a9d48c0fcb5699dbfe58964",
    "25c5bac4aee82e57a85aaf4e2513e4f05796b07ba2ee47d80506f8d2c25e50fd",
    "14de71e6c418559302f939b0e1abd576f279c4b2e0feb85c1f28ff18f58891ff",
    "ef132eef2fa09346aee33c28eb130ff28f5b766953334113211996d20011a198",
    "e3fc433f9f2541010ae17c1bf202580f6047472fb36857fe843b19f5984009dd",
    "c324044e847a4f4a0ab34f719595de37252d6235365e9b84392b061085349d73",
    "203a4a13e96f5432ec0fd4a1ee65accdd5e3904df54c1da510b0ff20dcc0c77f",
    "cb2c0e0eb605cb0504db87632cf3d8b4dae6e705769d1de354270123cb11450e",
    "fc60ac47683d7b8d0f811365565fd98c4c8eb936bcab8d069fc33bd801b03ade",
    "a2e1fbc5aa463d08ca19896d2bf59a071b851e6c239052172f296bfb5e724047",
    "90a2181014f3b94a4e97d117b438130368cc39dbb2d198065ae3986547926cd2",
    "162f40a29f0c3c8745c0f50fba3852e566d44575c29d39a03f0cda721984b6f4",
    "40591f355e12d439ff150aab7613499dbd49adabc8676eef023b15b65bfc5ca0",
    "6948109f23f350db82123535eb8a7433bdabcb909271a6ecbcb58b936a88cd4e",
    "8f2e6ff5800175f113253d8fa9ca8885c2f552e657dc603f252e1a8e308f76f0",
    "be79e2fb8f5d5fbbe2e30ecadd220723c8c0aea8078cdfcb3868263ff8f09400",
    "54da48781893a7e49ad5aff4af300cd804a6b6279ab3ff3afb64491c85194aab",
    "760d58a606654f9f4400e8b38591356fbf6425aca26dc85244259ff2b19c41b9",
    "f96f3ca9ec1dde434da7d2d392b905ddf3d1f9af93d1af5950bd493f5aa731b4",
    "056df31bd267b6b90a079831aaf579be0a39013137aac6d404f518cfd4684064",
    "7e78bfe706ca4cf5e9c5453e9f7cfd2b8b4c8d169a44e55c88d4a9a7f9474241",
    "e221af44860018ab0856972e194cd934",
);

/// RFC 9369 A.2: the protected client Initial, version 2 (packet number 2, 1200 bytes).
const RFC9369_CLIENT_INITIAL: &str = concat!(
    "d76b3343cf088394c8f03e5157080000449ea0c95e82ffe67b6abcdb4298b485",
    "dd04de806071bf03dceebfa162e75d6c96058bdbfb127cdfcbf903388e99ad04",
    "9f9a3dd4425ae4d0992cfff18ecf0fdb5a842d09747052f17ac2053d21f57c5d",
    "250f2c4f0e0202b70785b7946e992e58a59ac52dea6774d4f03b55545243cf1a",
    "12834e3f249a78d395e0d18f4d766004f1a2674802a747eaa901c3f10cda5500",
    "cb9122faa9f1df66c392079a1b40f0de1c6054196a11cbea40afb6ef5253cd68",
    "18f6625efce3b6def6ba7e4b37a40f7732e093daa7d52190935b8da58976ff33",
    "12ae50b187c1433c0f028edcc4c2838b6a9bfc226ca4b4530e7a4ccee1bfa2a3",
    "d396ae5a3fb512384b2fdd851f784a65e03f2c4fbe11a53c7777c023462239dd",
    "6f7521a3f6c7d5dd3ec9b3f233773d4b46d23cc375eb198c63301c21801f6520",
    "bcfb7966fc49b393f0061d974a2706df8c4a9449f11d7f3d2dcbb90c6b877045",
    "636e7c0c0fe4eb0f697545460c806910d2c355f1d253bc9d2452aaa549e27a1f",
    "ac7cf4ed77f322e8fa894b6a83810a34b361901751a6f5eb65a0326e07de7c12",
    "16ccce2d0193f958bb3850a833f7ae432b65bc5a53975c155aa4bcb4f7b2c4e5",
    "4df16efaf6ddea94e2c50b4cd1dfe06017e0e9d02900cffe1935e0491d77ffb4",
    "fdf85290fdd893d577b1131a610ef6a5c32b2ee0293617a37cbb08b847741c3b",
    "8017c25ca9052ca1079d8b78aebd47876d330a30f6a8c6d61dd1ab5589329de7",
    "14d19d61370f8149748c72f132f0fc99f34d766c6938597040d8f9e2bb522ff9",
    "9c63a344d6a2ae8aa8e51b7b90a4a806105fcbca31506c446151adfeceb51b91",
    "abfe43960977c87471cf9ad4074d30e10d6a7f03c63bd5d4317f68ff325ba3bd",
    "80bf4dc8b52a0ba031758022eb025cdd770b44d6d6cf0670f4e990b22347a7db",
    "848265e3e5eb72dfe8299ad7481a408322cac55786e52f633b2fb6b614eaed18",
    "d703dd84045a274ae8bfa73379661388d6991fe39b0d93debb41700b41f90a15",
    "c4d526250235ddcd6776fc77bc97e7a417ebcb31600d01e57f32162a8560cacc",
    "7e27a096d37a1a86952ec71bd89a3e9a30a2a26162984d7740f81193e8238e61",
    "f6b5b984d4d3dfa033c1bb7e4f0037febf406d91c0dccf32acf423cfa1e70710",
    "10d3f270121b493ce85054ef58bada42310138fe081adb04e2bd901f2f13458b",
    "3d6758158197107c14ebb193230cd1157380aa79cae1374a7c1e5bbcb80ee23e",
    "06ebfde206bfb0fcbc0edc4ebec309661bdd908d532eb0c6adc38b7ca7331dce",
    "8dfce39ab71e7c32d318d136b6100671a1ae6a6600e3899f31f0eed19e3417d1",
    "34b90c9058f8632c798d4490da4987307cba922d61c39805d072b589bd52fdf1",
    "e86215c2d54e6670e07383a27bbffb5addf47d66aa85a0c6f9f32e59d85a44dd",
    "5d3b22dc2be80919b490437ae4f36a0ae55edf1d0b5cb4e9a3ecabee93dfc6e3",
    "8d209d0fa6536d27a5d6fbb17641cde27525d61093f1b28072d111b2b4ae5f89",
    "d5974ee12e5cf7d5da4d6a31123041f33e61407e76cffcdcfd7e19ba58cf4b53",
    "6f4c4938ae79324dc402894b44faf8afbab35282ab659d13c93f70412e85cb19",
    "9a37ddec600545473cfb5a05e08d0b209973b2172b4d21fb69745a262ccde96b",
    "a18b2faa745b6fe189cf772a9f84cbfc",
);

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

pub(crate) fn hello(sni: &str, alpn: &[&str]) -> ClientHello {
    ClientHello {
        sni: Some(sni.to_string()),
        alpn: alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
    }
}

/// A variable-length integer in its shortest form.
fn varint(v: u64) -> Vec<u8> {
    match v {
        0..=0x3f => vec![v as u8],
        0x40..=0x3fff => ((v as u16) | 0x4000).to_be_bytes().to_vec(),
        0x4000..=0x3fff_ffff => ((v as u32) | 0x8000_0000).to_be_bytes().to_vec(),
        _ => (v | 0xc000_0000_0000_0000).to_be_bytes().to_vec(),
    }
}

pub(crate) fn crypto_frame(offset: usize, data: &[u8]) -> Vec<u8> {
    let mut f = vec![0x06];
    f.extend(varint(offset as u64));
    f.extend(varint(data.len() as u64));
    f.extend_from_slice(data);
    f
}

/// The keys a client protects its Initials with: the other side of what the reader derives.
fn client_keys(version: Version, dcid: &[u8]) -> DirectionalKeys {
    let suite = initial_suite().unwrap();
    Keys::initial(version.keys(), suite.suite, suite.quic, dcid, Side::Client).local
}

/// Builds a client's Initial: these frames in a packet of this number, protected as a client
/// protects it (the Length always in 2 bytes, as the sample packets have it).
pub(crate) fn initial(
    version: Version,
    dcid: &[u8],
    pn: u64,
    pn_len: usize,
    frames: &[u8],
) -> Vec<u8> {
    let keys = client_keys(version, dcid);
    let mut payload = frames.to_vec();
    // Enough bytes for the header protection sample past a 4-byte packet number.
    if payload.len() < MAX_PN_LEN - pn_len {
        payload.resize(MAX_PN_LEN - pn_len, 0);
    }
    let type_bits = match version {
        Version::V1 => 0,
        Version::V2 => 1,
    };
    let mut packet = vec![0xc0 | (type_bits << 4) | (pn_len as u8 - 1)];
    packet.extend(version.wire().to_be_bytes());
    packet.push(dcid.len() as u8);
    packet.extend_from_slice(dcid);
    packet.push(0); // no SCID
    packet.push(0); // no token
    let length = (pn_len + payload.len() + 16) as u16;
    packet.extend((length | 0x4000).to_be_bytes());
    let pn_offset = packet.len();
    packet.extend(&pn.to_be_bytes()[8 - pn_len..]);
    let tag = keys
        .packet
        .encrypt_in_place(pn, &packet, &mut payload)
        .unwrap();
    packet.extend(payload);
    packet.extend_from_slice(tag.as_ref());
    let sample = packet[pn_offset + 4..pn_offset + 20].to_vec();
    let (first, rest) = packet.split_at_mut(1);
    keys.header
        .encrypt_in_place(
            &sample,
            &mut first[0],
            &mut rest[pn_offset - 1..pn_offset - 1 + pn_len],
        )
        .unwrap();
    packet
}

/// A ClientHello handshake message (no record) with this name and these protocols.
pub(crate) fn hello_message(sni: &str, alpn: &[String]) -> Vec<u8> {
    let alpn: Vec<&str> = alpn.iter().map(String::as_str).collect();
    hello::build::client_hello(Some(sni), &alpn)[5..].to_vec()
}

/// Protocols enough to make a hello of several kilobytes, as post-quantum key shares make real ones.
pub(crate) fn big_alpn() -> Vec<String> {
    let mut alpn = vec!["h3".to_string()];
    for i in 0..24 {
        alpn.push(format!("{i:02}{}", "p".repeat(198)));
    }
    alpn
}

fn reader_for(first: &[u8]) -> InitialReader {
    InitialReader::new(first).unwrap()
}

fn dcid() -> Vec<u8> {
    unhex(SAMPLE_DCID)
}

#[test]
fn the_rfc_sample_client_initials_decrypt_to_their_hello() {
    for (version, packet, first) in [
        (Version::V1, RFC9001_CLIENT_INITIAL, 0xc0),
        (Version::V2, RFC9369_CLIENT_INITIAL, 0xd7),
    ] {
        let packet = unhex(packet);
        assert_eq!(packet.len(), 1200);
        assert_eq!(packet[0], first);
        let header = parse_long_header(&packet).unwrap();
        assert_eq!(
            header,
            LongHeader {
                version,
                packet_type: PacketType::Initial,
                dcid: &dcid(),
                scid: &[],
                token: &[],
                length: 1182,
                pn_offset: 18,
                packet_len: 1200,
            }
        );
        let mut reader = reader_for(&packet);
        assert_eq!(reader.version(), version);
        assert_eq!(reader.dcid(), dcid().as_slice());
        let expected = hello("example.com", &["alpn"]);
        assert_eq!(reader.push(&packet), Ok(Progress::Hello(expected.clone())));
        assert_eq!(reader.largest_pn, Some(2), "{version:?}");
        // Done: the same answer again, with no more work.
        assert_eq!(reader.push(&[]), Ok(Progress::Hello(expected)));
    }
}

#[test]
fn the_client_keys_protect_the_sample_payload_into_the_rfc_packets() {
    // The keys, IVs and header protection keys of RFC 9001 A.1 and RFC 9369 A.1 are behind
    // rustls' opaque keys; that they are right shows in the protected bytes being the RFC's.
    let mut payload = unhex(SAMPLE_CRYPTO_FRAME);
    payload.resize(SAMPLE_PAYLOAD_LEN, 0);
    for (version, expected) in [
        (Version::V1, RFC9001_CLIENT_INITIAL),
        (Version::V2, RFC9369_CLIENT_INITIAL),
    ] {
        assert_eq!(
            initial(version, &dcid(), 2, 4, &payload),
            unhex(expected),
            "{version:?}"
        );
    }
}

#[test]
fn a_hello_over_two_initials_in_two_datagrams_reads_whole() {
    let alpn = big_alpn();
    let message = hello_message("quic.example.net", &alpn);
    assert!(message.len() > 4000, "{}", message.len());
    let alpn_refs: Vec<&str> = alpn.iter().map(String::as_str).collect();
    let half = message.len() / 2;
    for version in [Version::V1, Version::V2] {
        let d = [7u8; 12];
        let one = initial(version, &d, 0, 1, &crypto_frame(0, &message[..half]));
        let two = initial(version, &d, 1, 2, &crypto_frame(half, &message[half..]));
        let mut reader = reader_for(&one);
        assert_eq!(reader.push(&one), Ok(Progress::NeedMore));
        assert_eq!(
            reader.push(&two),
            Ok(Progress::Hello(hello("quic.example.net", &alpn_refs)))
        );
    }
}

#[test]
fn crypto_data_out_of_order_duplicated_and_coalesced_reassembles() {
    let message = hello_message("a.example", &big_alpn());
    let alpn = big_alpn();
    let alpn_refs: Vec<&str> = alpn.iter().map(String::as_str).collect();
    let quarter = message.len() / 4;
    let piece = |i: usize| {
        let end = if i == 3 {
            message.len()
        } else {
            (i + 1) * quarter
        };
        crypto_frame(i * quarter, &message[i * quarter..end])
    };
    let d = dcid();
    let v = Version::V1;
    // Pieces 2, 0 (with a PING and an ACK), 2 again, then 3 and 1 coalesced in one datagram.
    let p2 = initial(v, &d, 0, 1, &piece(2));
    let mut frames = vec![0x01, 0x02, 0x00, 0x00, 0x00, 0x00];
    frames.extend(piece(0));
    frames.extend([0u8; 40]);
    let p0 = initial(v, &d, 1, 1, &frames);
    let p2_again = initial(v, &d, 2, 1, &piece(2));
    let mut last = initial(v, &d, 3, 2, &piece(3));
    last.extend(initial(v, &d, 4, 2, &piece(1)));
    let mut reader = reader_for(&p2);
    assert_eq!(reader.push(&p2), Ok(Progress::NeedMore));
    assert_eq!(reader.push(&p0), Ok(Progress::NeedMore));
    assert_eq!(reader.push(&p2_again), Ok(Progress::NeedMore));
    assert_eq!(reader.crypto.ranges.len(), 2);
    assert_eq!(
        reader.push(&last),
        Ok(Progress::Hello(hello("a.example", &alpn_refs)))
    );
    assert_eq!(reader.largest_pn, Some(4));
}

#[test]
fn overlapping_crypto_data_that_differs_fails_the_reader() {
    let message = hello_message("a.example", &["h3".to_string()]);
    let d = dcid();
    let one = initial(Version::V1, &d, 0, 1, &crypto_frame(0, &message[..40]));
    let mut forged = message[20..60].to_vec();
    forged[10] ^= 1;
    let two = initial(Version::V1, &d, 1, 1, &crypto_frame(20, &forged));
    let mut reader = reader_for(&one);
    assert_eq!(reader.push(&one), Ok(Progress::NeedMore));
    assert_eq!(reader.push(&two), Err(QuicError::CryptoConflict));
    // Failed for good: the same error for whatever comes next.
    let rest = initial(Version::V1, &d, 2, 1, &crypto_frame(0, &message));
    assert_eq!(reader.push(&rest), Err(QuicError::CryptoConflict));
}

#[test]
fn datagrams_that_do_not_decrypt_or_are_not_its_own_change_nothing() {
    let d = dcid();
    let message = hello_message("b.example", &["h3".to_string()]);
    let good = initial(Version::V1, &d, 0, 1, &crypto_frame(0, &message));
    let mut reader = reader_for(&good);
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 0x80;
    assert_eq!(reader.push(&flipped), Err(QuicError::Decrypt));
    let other = initial(Version::V1, &[9u8; 8], 0, 1, &crypto_frame(0, &message));
    assert_eq!(reader.push(&other), Err(QuicError::OtherConnection));
    let v2 = initial(Version::V2, &d, 0, 1, &crypto_frame(0, &message));
    assert_eq!(reader.push(&v2), Err(QuicError::OtherConnection));
    let short = [0x40u8, 1, 2, 3];
    assert_eq!(reader.push(&short), Err(QuicError::NotLongHeader));
    assert_eq!(reader.push(&[]), Err(QuicError::Empty));
    assert_eq!(
        reader.push(&good),
        Ok(Progress::Hello(hello("b.example", &["h3"])))
    );
}

#[test]
fn frames_an_initial_may_not_carry_fail_the_reader() {
    let d = dcid();
    for (frames, error) in [
        (vec![0x08, 0x00, 0x00], QuicError::FrameNotAllowed(0x08)),
        (vec![0x1c, 0x00, 0x00, 0x00], QuicError::ClientClosed),
        (
            vec![0x06, 0x00, 0x05, 1, 2],
            QuicError::Truncated("a CRYPTO frame's data"),
        ),
        (
            crypto_frame(MAX_CRYPTO - 1, &[1, 2]),
            QuicError::CryptoTooLarge,
        ),
        (
            vec![0x02, 0x00, 0x00, 0x3f, 0x00, 0x00],
            QuicError::Truncated("an ACK frame's range"),
        ),
        // A ServerHello where the ClientHello should be.
        (
            crypto_frame(0, &[2, 0, 0, 1, 0]),
            QuicError::Hello(HelloError::Malformed(
                "first handshake message is not a ClientHello",
            )),
        ),
    ] {
        let packet = initial(Version::V1, &d, 0, 1, &frames);
        let mut reader = reader_for(&packet);
        assert_eq!(reader.push(&packet), Err(error.clone()), "{frames:x?}");
        assert!(!error.to_string().is_empty());
    }
    // No frames at all (with a 4-byte packet number the tag alone is the sample).
    let empty = initial(Version::V1, &d, 0, 4, &[]);
    assert_eq!(reader_for(&empty).push(&empty), Err(QuicError::NoFrames));
}

#[test]
fn too_many_gaps_or_packets_fail_the_reader() {
    let d = dcid();
    let mut frames = Vec::new();
    for i in 0..=MAX_FRAGMENTS {
        frames.extend(crypto_frame(10 + 2 * i, &[0]));
    }
    let packet = initial(Version::V1, &d, 0, 1, &frames);
    let mut reader = reader_for(&packet);
    assert_eq!(reader.push(&packet), Err(QuicError::TooFragmented));

    let ping = |pn| initial(Version::V1, &d, pn, 2, &[0x01]);
    let mut reader = reader_for(&ping(0));
    for pn in 0..u64::from(MAX_PACKETS) {
        assert_eq!(reader.push(&ping(pn)), Ok(Progress::NeedMore));
    }
    assert_eq!(reader.push(&ping(99)), Err(QuicError::TooManyPackets));
}

#[test]
fn headers_that_cannot_be_read_say_why() {
    let good = unhex(RFC9001_CLIENT_INITIAL);
    for cut in 0..good.len() {
        let e = parse_long_header(&good[..cut]).unwrap_err();
        assert!(
            matches!(e, QuicError::Empty | QuicError::Truncated(_)),
            "cut at {cut}: {e}"
        );
    }
    let mut long_dcid = good.clone();
    long_dcid[5] = 21;
    assert_eq!(
        parse_long_header(&long_dcid),
        Err(QuicError::CidTooLong(21))
    );
    let short_dcid = initial(Version::V1, &[1, 2, 3, 4], 0, 1, &[0x01]);
    assert_eq!(
        InitialReader::new(&short_dcid).unwrap_err(),
        QuicError::InitialCidTooShort(4)
    );
    // After a Retry the DCID is the server's choice, and the Initial carries the Retry's token.
    let mut after_retry = vec![0xc0, 0, 0, 0, 1, 4, 1, 2, 3, 4, 0, 3, 9, 9, 9];
    after_retry.extend(varint(40));
    after_retry.resize(after_retry.len() + 40, 0);
    let reader = InitialReader::new(&after_retry).unwrap();
    assert_eq!(reader.dcid(), &[1, 2, 3, 4]);
    let mut draft29 = good.clone();
    draft29[1..5].copy_from_slice(&0xff00_001du32.to_be_bytes());
    assert_eq!(
        InitialReader::new(&draft29).unwrap_err(),
        QuicError::UnsupportedVersion(0xff00_001d)
    );
    assert_eq!(
        version(&draft29),
        Err(QuicError::UnsupportedVersion(0xff00_001d))
    );
    let mut negotiation = good.clone();
    negotiation[1..5].fill(0);
    assert_eq!(version(&negotiation), Err(QuicError::VersionNegotiation));
    // A Handshake packet cannot start a connection.
    let mut handshake = good.clone();
    handshake[0] = 0xe0;
    assert_eq!(
        InitialReader::new(&handshake).unwrap_err(),
        QuicError::NotInitial(PacketType::Handshake)
    );
    assert_eq!(version(&good), Ok(Version::V1));
    assert_eq!(version(&unhex(RFC9369_CLIENT_INITIAL)), Ok(Version::V2));
    assert_eq!(version(&[]), Err(QuicError::Empty));
    assert_eq!(version(&[0x41]), Err(QuicError::NotLongHeader));
}

#[test]
fn coalesced_packets_are_each_found() {
    let d = dcid();
    let mut datagram = initial(Version::V2, &d, 0, 1, &[0x01]);
    let first_len = datagram.len();
    datagram.extend(initial(Version::V2, &d, 1, 1, &[0x01]));
    datagram.extend([0x40, 1, 2, 3, 4, 5, 6, 7, 8]); // a short-header packet ends it
    let packets: Vec<_> = long_packets(&datagram).collect();
    assert_eq!(packets.len(), 2);
    let (bytes, header) = packets[0].as_ref().unwrap();
    assert_eq!(bytes.len(), first_len);
    assert_eq!(header.packet_type, PacketType::Initial);
    assert_eq!(header.version, Version::V2);
    // A packet that does not parse ends the walk with its error.
    let mut broken = initial(Version::V1, &d, 0, 1, &[0x01]);
    broken.extend([0xc0, 0, 0, 0, 1, 30]);
    let walked: Vec<_> = long_packets(&broken).collect();
    assert_eq!(walked.len(), 2);
    assert_eq!(walked[1], Err(QuicError::CidTooLong(30)));
}

#[test]
fn short_headers_give_their_connection_id() {
    let packet = [0x41, 1, 2, 3, 4, 5, 6, 7, 8, 9];
    assert_eq!(short_header_dcid(&packet, 8), Some(&packet[1..9]));
    assert_eq!(short_header_dcid(&packet, 0), Some(&[][..]));
    assert_eq!(short_header_dcid(&packet, 10), None);
    assert_eq!(short_header_dcid(&packet, 21), None);
    assert_eq!(short_header_dcid(&[], 0), None);
    assert_eq!(short_header_dcid(&unhex(RFC9001_CLIENT_INITIAL), 8), None);
    assert!(!is_long_header(&packet));
    assert!(is_long_header(&unhex(RFC9001_CLIENT_INITIAL)));
    assert!(!is_long_header(&[]));
}

#[test]
fn packet_numbers_decode_as_the_rfc_example() {
    // RFC 9000 A.3.
    assert_eq!(
        decode_packet_number(Some(0xa82f30ea), 0x9b32, 2),
        0xa82f9b32
    );
    assert_eq!(decode_packet_number(None, 0, 1), 0);
    assert_eq!(decode_packet_number(Some(0xff), 0x01, 1), 0x101);
}

/// A small deterministic generator: the same cases on every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Every entry point on random, truncated and bit-flipped inputs: errors, never panics, and a
/// flipped bit of a protected packet never reads as a hello.
#[test]
fn random_truncated_and_flipped_inputs_never_panic() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let samples = [
        unhex(RFC9001_CLIENT_INITIAL),
        unhex(RFC9369_CLIENT_INITIAL),
        initial(
            Version::V1,
            &[3u8; 20],
            5,
            2,
            &crypto_frame(0, &hello_message("x.example", &["h3".to_string()])),
        ),
    ];
    let exercise = |input: &[u8], reader: &mut InitialReader| {
        let _ = parse_long_header(input);
        let _ = long_packets(input).count();
        let _ = version(input);
        let _ = short_header_dcid(input, input.len() % 22);
        if let Ok(mut own) = InitialReader::new(input) {
            let _ = own.push(input);
        }
        reader.push(input)
    };
    for case in 0..3000 {
        let sample = &samples[case % samples.len()];
        let mut reader = reader_for(sample);
        let input = match case % 3 {
            0 => {
                let mut random = vec![0u8; rng.below(1300)];
                random.iter_mut().for_each(|b| *b = rng.next() as u8);
                if case % 2 == 0 && !random.is_empty() {
                    // A plausible long header keeps the walk going past the first byte.
                    random[0] |= 0xc0;
                    if random.len() > 5 {
                        random[1..5].copy_from_slice(&VERSION_1.to_be_bytes());
                    }
                }
                random
            }
            1 => sample[..rng.below(sample.len())].to_vec(),
            _ => {
                let mut flipped = sample.clone();
                let at = rng.below(flipped.len());
                flipped[at] ^= 1 << rng.below(8);
                let result = exercise(&flipped, &mut reader);
                assert!(
                    !matches!(result, Ok(Progress::Hello(_))),
                    "a flipped bit at {at} read as a hello"
                );
                continue;
            }
        };
        let _ = exercise(&input, &mut reader);
    }
}
