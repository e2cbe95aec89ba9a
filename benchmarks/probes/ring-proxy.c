// ring-proxy: the least C that relays TCP through one io_uring, with the levers issue 25 asks about
// switched on one at a time, so benchmarks/bench.py can measure what each is worth beside HAProxy,
// nginx and sluicegate. A measuring instrument, not a design to copy: no config, no health, no
// limits beyond the back-pressure cap. See README.md.
//
//   ring-proxy --levers base|ms[+reg][+ring][+wait] LISTEN=BACKEND[,BACKEND...] [LISTEN=...]
//
// Every variant: one ring (SINGLE_ISSUER | DEFER_TASKRUN), a multishot accept per listener, new
// connections to the backends in turn, submissions batched into the wait (one io_uring_enter per
// loop), TCP_NODELAY both ways, half-close passed on with shutdown(2) (IORING_OP_SHUTDOWN is always
// punted to an io-wq worker), a reset passed on as a reset.
//   base  one recv and one send in flight per direction, a 16 KiB buffer per direction, a blocking
//         connect(2), close(2): the team's earlier throw-away probe (the starting point).
//   ms    multishot receive into a ring of provided buffers shared by every connection; sends in
//         order from a per-direction queue; the receive is cancelled when its queue holds CAP
//         buffers and re-armed when it drains (ENOBUFS too re-arms once a buffer is back).
//   reg   the ring's descriptor registered (io_uring_enter skips the fd lookup).
//   ring  connect (non-blocking socket, a linked 5 s timeout) and close through the ring.
//   wait  batched waits: wait for up to BATCH completions but no longer than MIN_WAIT_US once one
//         is there (IORING_ENTER_EXT_ARG's min_wait_usec, Linux 6.12+).
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "args.h"

#define BUF 16384
#define NBUF 4096 /* provided buffers (ms): 64 MiB of address space, touched as used */
#define BGID 1
#define CAP 8 /* buffers queued per direction before its receive is cancelled (ms) */
#define QMAX 512 /* queue slots: CAP plus what a multishot posts before the cancel lands */
#define BATCH 16
#define MIN_WAIT_US 50
#define FEAT_MIN_TIMEOUT (1U << 15)

enum { OP_ACCEPT = 1, OP_RECV, OP_SEND, OP_CONNECT, OP_TIMEOUT, OP_CANCEL, OP_MASK = 7 };

static int L_MS, L_REG, L_RING, L_WAIT;
static struct io_uring ring;
static struct io_uring_buf_ring *br;
static char *bufs;

struct svc {
  int lfd;
  struct sockaddr_in be[MAX_BACKENDS];
  int nb;
  unsigned rr;
} __attribute__((aligned(16)));

struct qent { unsigned short bid; int len, off; };
struct conn;
struct dir {
  struct conn *c;
  struct dir *other;
  int from, to;
  char *buf; int len, off;       /* base */
  struct qent q[QMAX]; int qh, qn; /* ms: buffers received, not yet sent */
  int recv_armed, sending, cancelled, eof, shut, starved;
} __attribute__((aligned(16)));
struct conn {
  struct dir up, down;
  int cfd, bfd, refs, aborted;
} __attribute__((aligned(16)));

static struct dir *starved[65536];
static int nstarved;

static struct io_uring_sqe *sqe(void) {
  struct io_uring_sqe *s = io_uring_get_sqe(&ring);
  if (!s) { io_uring_submit(&ring); s = io_uring_get_sqe(&ring); }
  return s;
}
static void tag(struct io_uring_sqe *s, void *p, int op) { io_uring_sqe_set_data64(s, (uint64_t)(uintptr_t)p | op); }

static void post_recv(struct dir *d) {
  struct io_uring_sqe *s = sqe();
  if (L_MS) {
    io_uring_prep_recv_multishot(s, d->from, NULL, 0, 0);
    s->flags |= IOSQE_BUFFER_SELECT;
    s->buf_group = BGID;
  } else {
    io_uring_prep_recv(s, d->from, d->buf, BUF, 0);
  }
  tag(s, d, OP_RECV);
  d->recv_armed = 1; d->cancelled = 0; d->c->refs++;
}
static void post_send(struct dir *d) {
  struct io_uring_sqe *s = sqe();
  if (L_MS) {
    struct qent *e = &d->q[d->qh];
    io_uring_prep_send(s, d->to, bufs + (size_t)e->bid * BUF + e->off, e->len - e->off, MSG_NOSIGNAL);
  } else {
    io_uring_prep_send(s, d->to, d->buf + d->off, d->len - d->off, MSG_NOSIGNAL);
  }
  tag(s, d, OP_SEND);
  d->sending = 1; d->c->refs++;
}
static void give_back(unsigned short bid) {
  io_uring_buf_ring_add(br, bufs + (size_t)bid * BUF, BUF, bid, io_uring_buf_ring_mask(NBUF), 0);
  io_uring_buf_ring_advance(br, 1);
}

static void close_fd(int fd) {
  if (L_RING) { struct io_uring_sqe *s = sqe(); io_uring_prep_close(s, fd); io_uring_sqe_set_data64(s, 0); }
  else close(fd);
}
// A connection ends when both directions are done and nothing of it is in the kernel.
static void maybe_free(struct conn *c) {
  if (c->refs || !((c->up.shut && c->down.shut) || c->aborted)) return;
  close_fd(c->cfd); close_fd(c->bfd);
  if (L_MS) { for (int i = 0; i < 2; i++) { struct dir *d = i ? &c->down : &c->up; for (int k = 0; k < d->qn; k++) give_back(d->q[(d->qh + k) % QMAX].bid); } }
  else { free(c->up.buf); free(c->down.buf); }
  if (c->up.starved || c->down.starved)
    for (int i = 0; i < nstarved; i++) if (starved[i]->c == c) starved[i--] = starved[--nstarved];
  free(c);
}
// A side failed: the other must see a reset; pending operations end with errors or EOF.
static void abort_conn(struct conn *c, int reset_fd) {
  if (c->aborted) return;
  c->aborted = 1;
  struct linger l = {1, 0};
  setsockopt(reset_fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
  shutdown(c->cfd, SHUT_RDWR); shutdown(c->bfd, SHUT_RDWR);
}
static void half_close(struct dir *d) {
  if (!d->shut) { d->shut = 1; shutdown(d->to, SHUT_WR); }
}
static void start(struct conn *c) {
  struct dir *u = &c->up, *d = &c->down;
  u->c = d->c = c; u->other = d; d->other = u;
  u->from = c->cfd; u->to = c->bfd; d->from = c->bfd; d->to = c->cfd;
  if (!L_MS) { u->buf = malloc(BUF); d->buf = malloc(BUF); }
  post_recv(u); post_recv(d);
}
static void on_accept(struct svc *sv, int fd) {
  int one = 1, b = socket(AF_INET, SOCK_STREAM | (L_RING ? SOCK_NONBLOCK : 0), 0);
  if (b < 0) { close(fd); return; }
  setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  struct conn *c = aligned_alloc(16, sizeof *c);
  memset(c, 0, sizeof *c);
  c->cfd = fd; c->bfd = b;
  struct sockaddr_in *to = &sv->be[sv->rr++ % sv->nb];
  if (!L_RING) {
    if (connect(b, (void *)to, sizeof *to)) { close(b); close(fd); free(c); return; }
    start(c);
    return;
  }
  static struct __kernel_timespec five = {.tv_sec = 5};
  struct io_uring_sqe *s = sqe();
  io_uring_prep_connect(s, b, (void *)to, sizeof *to);
  s->flags |= IOSQE_IO_LINK;
  tag(s, c, OP_CONNECT);
  s = sqe();
  io_uring_prep_link_timeout(s, &five, 0);
  tag(s, c, OP_TIMEOUT);
  c->refs += 2;
}

static void on_recv(struct dir *d, int res, unsigned flags) {
  struct conn *c = d->c;
  int last = !(flags & IORING_CQE_F_MORE);
  if (last) d->recv_armed = 0;
  if (res > 0) {
    if (!L_MS) { d->len = res; d->off = 0; post_send(d); return; }
    unsigned short bid = flags >> IORING_CQE_BUFFER_SHIFT;
    if (d->qn == QMAX) fprintf(stderr, "ring-proxy: queue overflow, connection reset\n");
    if (c->aborted || d->qn == QMAX) { give_back(bid); if (d->qn == QMAX) abort_conn(c, d->from); return; }
    d->q[(d->qh + d->qn++) % QMAX] = (struct qent){bid, res, 0};
    if (!d->sending) post_send(d);
    if (d->recv_armed && d->qn >= CAP && !d->cancelled) {
      struct io_uring_sqe *s = sqe();
      io_uring_prep_cancel64(s, (uint64_t)(uintptr_t)d | OP_RECV, 0);
      tag(s, c, OP_CANCEL);
      d->cancelled = 1; c->refs++;
    }
  } else if (res == 0) {
    d->eof = 1;
    if (!d->sending) half_close(d);
    return;
  } else if (res == -ENOBUFS) {
    /* Re-armed once a buffer is back (on_send). */
    if (!d->starved && nstarved < (int)(sizeof starved / sizeof *starved)) { d->starved = 1; starved[nstarved++] = d; }
    return;
  } else if (res != -ECANCELED) {
    if (!c->aborted) abort_conn(c, d->to);
    return;
  }
  /* A multishot receive that ended (cancelled at the cap, or by the kernel) goes on below the cap;
     above it, on_send re-arms it as the queue drains. */
  if (L_MS && last && !d->recv_armed && !d->eof && !c->aborted && d->qn < CAP / 2) post_recv(d);
}
static void on_send(struct dir *d, int res) {
  struct conn *c = d->c;
  d->sending = 0;
  if (res < 0) { if (!c->aborted) abort_conn(c, d->from); return; }
  if (!L_MS) {
    d->off += res;
    if (d->off < d->len) post_send(d); else if (!c->aborted) post_recv(d);
    return;
  }
  struct qent *e = &d->q[d->qh];
  e->off += res;
  if (e->off < e->len) { if (!c->aborted) post_send(d); return; }
  give_back(e->bid);
  d->qh = (d->qh + 1) % QMAX; d->qn--;
  if (c->aborted) return;
  if (d->qn) post_send(d);
  else if (d->eof) half_close(d);
  if (!d->recv_armed && !d->eof && !d->starved && d->qn < CAP / 2) post_recv(d);
  // A buffer is back: the directions that ran out may read again.
  while (nstarved) { struct dir *s = starved[--nstarved]; s->starved = 0; if (!s->recv_armed && !s->eof && !s->c->aborted) post_recv(s); }
}

static void handle(struct io_uring_cqe *cqe, struct svc *svcs, int nsvc) {
  uint64_t ud = io_uring_cqe_get_data64(cqe);
  if (!ud) return; /* a close through the ring */
  int op = ud & OP_MASK, res = cqe->res;
  void *p = (void *)(uintptr_t)(ud & ~(uint64_t)OP_MASK);
  if (op == OP_ACCEPT) {
    struct svc *sv = p;
    if (!(cqe->flags & IORING_CQE_F_MORE)) {
      struct io_uring_sqe *s = sqe(); io_uring_prep_multishot_accept(s, sv->lfd, NULL, NULL, 0); tag(s, sv, OP_ACCEPT);
    }
    if (res >= 0) on_accept(sv, res);
    (void)svcs; (void)nsvc;
    return;
  }
  if (op == OP_CONNECT || op == OP_TIMEOUT || op == OP_CANCEL) {
    struct conn *c = p;
    c->refs--;
    if (op == OP_CONNECT) {
      if (res == 0) start(c);
      else { c->aborted = 1; c->up.shut = c->down.shut = 1; }
    }
    maybe_free(c);
    return;
  }
  struct dir *d = p;
  struct conn *c = d->c;
  if (op == OP_RECV) {
    on_recv(d, res, cqe->flags);
    if (!(cqe->flags & IORING_CQE_F_MORE)) c->refs--;
  } else {
    on_send(d, res);
    c->refs--;
  }
  maybe_free(c);
}

// One io_uring_enter: submit what is queued, then wait (for up to BATCH completions, at most
// MIN_WAIT_US once one has come, with `wait`; otherwise for one).
static void enter(void) {
  if (!L_WAIT) { io_uring_submit_and_wait(&ring, 1); return; }
  struct io_uring_sq *sq = &ring.sq;
  unsigned tail = sq->sqe_tail, n = tail - sq->sqe_head;
  if (n) { sq->sqe_head = tail; io_uring_smp_store_release(sq->ktail, tail); }
  struct __kernel_timespec ts = {.tv_sec = 1};
  struct io_uring_getevents_arg arg = {.sigmask_sz = _NSIG / 8, .pad = MIN_WAIT_US, .ts = (uint64_t)(uintptr_t)&ts};
  unsigned flags = IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG;
  int fd = ring.ring_fd;
  if (L_REG) { flags |= IORING_ENTER_REGISTERED_RING; fd = ring.enter_ring_fd; }
  syscall(__NR_io_uring_enter, fd, n, BATCH, flags, &arg, sizeof arg);
}

static int usage(void) { fprintf(stderr, "usage: ring-proxy --levers base|ms[+reg][+ring][+wait] LISTEN=BACKEND[,BACKEND...]...\n"); return 2; }

int main(int argc, char **argv) {
  if (argc < 4 || strcmp(argv[1], "--levers")) return usage();
  const struct lever levers[] = {{"ms", &L_MS}, {"reg", &L_REG}, {"ring", &L_RING}, {"wait", &L_WAIT}, {0}};
  if (parse_levers("ring-proxy", argv[2], levers)) return usage();
  signal(SIGPIPE, SIG_IGN);
  struct io_uring_params p = {0};
  p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SUBMIT_ALL;
  p.flags |= IORING_SETUP_CQSIZE; p.cq_entries = 65536;
  int e = io_uring_queue_init_params(4096, &ring, &p);
  if (e < 0) { fprintf(stderr, "ring-proxy: io_uring_setup: %s\n", strerror(-e)); return 1; }
  if (L_WAIT && !(p.features & FEAT_MIN_TIMEOUT)) { fprintf(stderr, "ring-proxy: this kernel has no min_wait (Linux 6.12+)\n"); return 1; }
  if (L_REG && (e = io_uring_register_ring_fd(&ring)) != 1) { fprintf(stderr, "ring-proxy: register_ring_fd: %s\n", strerror(-e)); return 1; }
  if (L_MS) {
    bufs = mmap(NULL, (size_t)NBUF * BUF, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    br = mmap(NULL, NBUF * sizeof(struct io_uring_buf), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (bufs == MAP_FAILED || br == MAP_FAILED) { perror("ring-proxy: mmap"); return 1; }
    struct io_uring_buf_reg reg = {.ring_addr = (uintptr_t)br, .ring_entries = NBUF, .bgid = BGID};
    if ((e = io_uring_register_buf_ring(&ring, &reg, 0))) { fprintf(stderr, "ring-proxy: register_buf_ring: %s\n", strerror(-e)); return 1; }
    io_uring_buf_ring_init(br);
    for (int i = 0; i < NBUF; i++) io_uring_buf_ring_add(br, bufs + (size_t)i * BUF, BUF, i, io_uring_buf_ring_mask(NBUF), i);
    io_uring_buf_ring_advance(br, NBUF);
  }
  int nsvc = argc - 3;
  struct svc *svcs = aligned_alloc(16, sizeof *svcs * nsvc);
  memset(svcs, 0, sizeof *svcs * nsvc);
  for (int i = 0; i < nsvc; i++) {
    int ls = parse_service("ring-proxy", argv[3 + i], 0, svcs[i].be, &svcs[i].nb);
    if (ls == -2) return 1;
    if (ls < 0) return usage();
    svcs[i].lfd = ls;
    struct io_uring_sqe *s = sqe(); io_uring_prep_multishot_accept(s, ls, NULL, NULL, 0); tag(s, &svcs[i], OP_ACCEPT);
  }
  for (;;) {
    enter();
    struct io_uring_cqe *cqe; unsigned head, seen = 0;
    io_uring_for_each_cqe(&ring, head, cqe) { seen++; handle(cqe, svcs, nsvc); }
    io_uring_cq_advance(&ring, seen);
  }
}
