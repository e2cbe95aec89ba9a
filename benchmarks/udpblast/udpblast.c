// udpblast: the UDP load of benchmarks/udp.py, and its echo backend. A measuring instrument, IPv4
// and loopback only; every loop ends at a count or a deadline. Each mode prints one JSON object per
// phase on stdout.
//
//   udpblast echo IP:PORT SECONDS
//       answers every datagram to its sender, byte for byte (recvmmsg/sendmmsg, 64 at a time),
//       until SIGTERM or SECONDS.
//   udpblast flows IP:PORT FLOWS COUNT SECONDS SIZE WINDOW
//       FLOWS connected sockets send COUNT datagrams of SIZE bytes in all (sendmmsg), each flow
//       keeping at most WINDOW unanswered, and read the echoes (recvmmsg). A flow that hears nothing
//       for 100 ms takes its window back (the datagrams are counted lost at the end).
//   udpblast hold IP:PORT N PASSES SECONDS SIZE
//       opens N sockets, socket i bound to 127.2.0.0 + i, port 10999 (one client address per socket,
//       so one session each; a port outside the ephemeral range, which is left to the proxy's own
//       sockets: each one it opens for a session takes an ephemeral port), each sends one datagram and waits for its echo; prints "held"; after a line
//       on stdin, PASSES more passes over every socket the same way, prints "passes"; after another
//       line (or EOF) closes them all. Windows of 64 sockets at a time: a larger burst would
//       overflow a listen socket's default receive buffer, which is not what this measures.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAXSIZE 65536
#define MAXFLOWS 64
#define HOLD_WINDOW 64
#define HOLD_PORT 10999

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static void die(const char *what) {
  perror(what);
  exit(1);
}

static int parse_addr(const char *s, struct sockaddr_in *a) {
  char h[64];
  const char *c = strrchr(s, ':');
  if (!c || c - s >= (long)sizeof h) return -1;
  memcpy(h, s, c - s);
  h[c - s] = 0;
  memset(a, 0, sizeof *a);
  a->sin_family = AF_INET;
  a->sin_port = htons(atoi(c + 1));
  return inet_pton(AF_INET, h, &a->sin_addr) == 1 ? 0 : -1;
}

// Big socket buffers, so a burst is not lost in our own sockets (FORCE where allowed).
static void buffers(int fd, int bytes) {
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof bytes))
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes);
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof bytes))
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
}

static unsigned char bufs[BATCH][MAXSIZE];

static int echo(struct sockaddr_in *at, double seconds) {
  struct mmsghdr m[BATCH];
  struct iovec iov[BATCH];
  struct sockaddr_in from[BATCH];
  long long echoed = 0, failed = 0;
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
  if (fd < 0) die("socket");
  buffers(fd, 8 << 20);
  if (bind(fd, (void *)at, sizeof *at)) die("bind");
  signal(SIGTERM, on_term);
  signal(SIGINT, on_term);
  double end = now() + seconds;
  while (!stop && now() < end) {
    struct pollfd p = {fd, POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    for (int i = 0; i < BATCH; i++) {
      iov[i] = (struct iovec){bufs[i], MAXSIZE};
      m[i].msg_hdr = (struct msghdr){.msg_name = &from[i], .msg_namelen = sizeof from[i], .msg_iov = &iov[i],
                                     .msg_iovlen = 1};
    }
    int n = recvmmsg(fd, m, BATCH, MSG_DONTWAIT, NULL);
    if (n <= 0) continue;
    for (int i = 0; i < n; i++) iov[i].iov_len = m[i].msg_len;
    for (int done = 0; done < n;) {
      int k = sendmmsg(fd, m + done, n - done, 0);
      if (k < 0) {
        if (errno == EAGAIN || errno == EINTR) {
          struct pollfd w = {fd, POLLOUT, 0};
          poll(&w, 1, 10);
          continue;
        }
        failed++;  // a sender gone (ICMP): skip its datagram
        done++;
        continue;
      }
      done += k;
      echoed += k;
    }
  }
  printf("{\"echoed\": %lld, \"failed\": %lld}\n", echoed, failed);
  return 0;
}

static int flows(struct sockaddr_in *to, int nflows, long long count, double seconds, int size, int window) {
  int fd[MAXFLOWS], inflight[MAXFLOWS] = {0};
  double heard[MAXFLOWS];
  struct mmsghdr m[BATCH];
  struct iovec iov[BATCH];
  long long sent = 0, received = 0, stalls = 0, bad = 0;
  if (nflows < 1 || nflows > MAXFLOWS || size < 8 || size > MAXSIZE || window < 1) {
    fprintf(stderr, "flows: 1..%d flows, 8..%d bytes, a window of 1 or more\n", MAXFLOWS, MAXSIZE);
    return 2;
  }
  for (int f = 0; f < nflows; f++) {
    fd[f] = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (fd[f] < 0) die("socket");
    buffers(fd[f], 4 << 20);
    if (connect(fd[f], (void *)to, sizeof *to)) die("connect");
  }
  for (int i = 0; i < BATCH; i++) memset(bufs[i], 'x', size);
  double start = now(), end = start + seconds, last = start;
  for (int f = 0; f < nflows; f++) heard[f] = start;
  while (now() < end) {
    int progress = 0;
    for (int f = 0; f < nflows && sent < count; f++) {
      int k = window - inflight[f];
      if (k > BATCH) k = BATCH;
      if (k > count - sent) k = (int)(count - sent);
      if (k <= 0) continue;
      for (int i = 0; i < k; i++) {
        memcpy(bufs[i], &sent, sizeof sent);
        iov[i] = (struct iovec){bufs[i], (size_t)size};
        m[i].msg_hdr = (struct msghdr){.msg_iov = &iov[i], .msg_iovlen = 1};
      }
      int n = sendmmsg(fd[f], m, k, MSG_DONTWAIT);
      if (n > 0) {
        sent += n;
        inflight[f] += n;
        progress = 1;
      }
    }
    for (int f = 0; f < nflows; f++) {
      for (;;) {
        for (int i = 0; i < BATCH; i++) {
          iov[i] = (struct iovec){bufs[i], MAXSIZE};
          m[i].msg_hdr = (struct msghdr){.msg_iov = &iov[i], .msg_iovlen = 1};
        }
        int n = recvmmsg(fd[f], m, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) break;
        for (int i = 0; i < n; i++) bad += m[i].msg_len != (unsigned)size;
        received += n;
        inflight[f] = inflight[f] > n ? inflight[f] - n : 0;
        heard[f] = last = now();
        progress = 1;
      }
    }
    if (sent >= count && received >= sent) break;
    if (!progress) {
      struct pollfd p[MAXFLOWS];
      for (int f = 0; f < nflows; f++) p[f] = (struct pollfd){fd[f], POLLIN, 0};
      poll(p, nflows, 5);
      double t = now();
      for (int f = 0; f < nflows; f++)
        if (inflight[f] && t - heard[f] > 0.1) {  // the rest of this window is lost
          inflight[f] = 0;
          heard[f] = t;
          stalls++;
        }
      if (sent >= count && t - last > 0.5) break;
    }
  }
  double secs = (received ? last : now()) - start;
  printf("{\"flows\": %d, \"size\": %d, \"sent\": %lld, \"received\": %lld, \"lost\": %lld, \"wrong_size\": %lld, "
         "\"stalls\": %lld, \"seconds\": %.6f}\n",
         nflows, size, sent, received, sent - received, bad, stalls, secs);
  return 0;
}

// One pass: every socket sends one datagram and waits for its echo, HOLD_WINDOW sockets at a time,
// a window given up after 0.5 s. Adds to *sent and *received.
static void pass(int *fd, int n, int size, long long *sent, long long *received) {
  static char answered[HOLD_WINDOW];
  struct pollfd p[HOLD_WINDOW];
  for (int base = 0; base < n; base += HOLD_WINDOW) {
    int w = n - base < HOLD_WINDOW ? n - base : HOLD_WINDOW, left = 0;
    for (int i = 0; i < w; i++) {
      answered[i] = 1;
      if (send(fd[base + i], bufs[0], size, MSG_DONTWAIT) == size) {
        (*sent)++;
        answered[i] = 0;
        left++;
      }
    }
    double end = now() + 0.5;
    while (left > 0 && now() < end) {
      int np = 0, idx[HOLD_WINDOW];
      for (int i = 0; i < w; i++)
        if (!answered[i]) {
          p[np] = (struct pollfd){fd[base + i], POLLIN, 0};
          idx[np++] = i;
        }
      if (poll(p, np, 50) <= 0) continue;
      for (int j = 0; j < np; j++)
        if (p[j].revents & POLLIN) {
          while (recv(p[j].fd, bufs[1], MAXSIZE, MSG_DONTWAIT) >= 0) {
            if (!answered[idx[j]]) {
              answered[idx[j]] = 1;
              (*received)++;
              left--;
            }
          }
        } else if (p[j].revents) {  // an error (ICMP): nothing will come
          int e;
          socklen_t l = sizeof e;
          getsockopt(p[j].fd, SOL_SOCKET, SO_ERROR, &e, &l);
          answered[idx[j]] = 1;
          left--;
        }
    }
  }
}

// Waits for a line on stdin (or EOF) for at most `seconds`.
static void await_line(double seconds) {
  struct pollfd p = {0, POLLIN, 0};
  char line[64];
  if (poll(&p, 1, (int)(seconds * 1000)) > 0 && (p.revents & POLLIN)) (void)!read(0, line, sizeof line);
}

static int hold(struct sockaddr_in *to, int n, int passes, double seconds, int size) {
  int *fd = calloc(n, sizeof *fd);
  if (!fd || n < 1 || n > (1 << 22) || size < 1 || size > MAXSIZE) {
    fprintf(stderr, "hold: 1..%d sockets, 1..%d bytes\n", 1 << 22, MAXSIZE);
    return 2;
  }
  memset(bufs[0], 'h', size);
  int opened = 0;
  for (; opened < n; opened++) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(HOLD_PORT)};
    a.sin_addr.s_addr = htonl((127u << 24 | 2u << 16) + (unsigned)opened);
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (s < 0) break;  // out of descriptors: hold what we have, and say so
    if (bind(s, (void *)&a, sizeof a) || connect(s, (void *)to, sizeof *to)) die("bind/connect");
    fd[opened] = s;
  }
  long long sent = 0, received = 0;
  double t0 = now();
  pass(fd, opened, size, &sent, &received);
  printf("{\"phase\": \"held\", \"wanted\": %d, \"sockets\": %d, \"sent\": %lld, \"received\": %lld, "
         "\"seconds\": %.6f}\n", n, opened, sent, received, now() - t0);
  fflush(stdout);
  await_line(seconds);
  sent = received = 0;
  t0 = now();
  for (int i = 0; i < passes; i++) pass(fd, opened, size, &sent, &received);
  printf("{\"phase\": \"passes\", \"sockets\": %d, \"passes\": %d, \"sent\": %lld, \"received\": %lld, "
         "\"lost\": %lld, \"seconds\": %.6f}\n", opened, passes, sent, received, sent - received, now() - t0);
  fflush(stdout);
  await_line(seconds);
  return 0;
}

int main(int argc, char **argv) {
  struct sockaddr_in a;
  if (argc >= 4 && !strcmp(argv[1], "echo") && !parse_addr(argv[2], &a)) return echo(&a, atof(argv[3]));
  if (argc >= 8 && !strcmp(argv[1], "flows") && !parse_addr(argv[2], &a))
    return flows(&a, atoi(argv[3]), atoll(argv[4]), atof(argv[5]), atoi(argv[6]), atoi(argv[7]));
  if (argc >= 7 && !strcmp(argv[1], "hold") && !parse_addr(argv[2], &a))
    return hold(&a, atoi(argv[3]), atoi(argv[4]), atof(argv[5]), atoi(argv[6]));
  fprintf(stderr,
          "usage: udpblast echo IP:PORT SECONDS\n"
          "       udpblast flows IP:PORT FLOWS COUNT SECONDS SIZE WINDOW\n"
          "       udpblast hold IP:PORT N PASSES SECONDS SIZE\n");
  return 2;
}
