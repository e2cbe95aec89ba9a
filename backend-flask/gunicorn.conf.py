# gunicorn settings for the demo backend: threads so /slow and /bytes do not block other requests,
# and a graceful stop: on SIGTERM workers finish what they serve (up to graceful_timeout).
bind = "0.0.0.0:5000"
# One worker: the health switch and the request counter live in its memory.
workers = 1
worker_class = "gthread"
threads = 32
graceful_timeout = 30
timeout = 120
keepalive = 5
accesslog = "-"
