// epoll-proxy: the least C that relays TCP through one thread's epoll, so benchmarks/bench.py can
// measure what an epoll relay costs at its floor, beside nginx and sluicegate's epoll engine (the
// fallback where io_uring is not allowed). A measuring instrument, not a design to copy: no config,
// no health, no timeouts, no limits. See README.md.
//
//   epoll-proxy --levers base[+thread][+held] LISTEN=BACKEND[,BACKEND...] [LISTEN=...]
//
// Every variant: one thread, one epoll instance; the listeners level-triggered, one accept4(2) per
// event (nginx's default, `multi_accept off`); each connection's two sockets registered once,
// edge-triggered, for reading, writing and the peer's half-close; new connections to the backends
// in turn, with a non-blocking connect(2) whose result is read with SO_ERROR when the socket first
// turns writable (as nginx does); a 16 KiB buffer per direction; a read shorter than the buffer
// taken to have emptied the socket (the next arrival is a new edge) unless the peer's FIN has been
// signalled, so a small request costs one recv(2) and one send(2); TCP_NODELAY both ways; a
// half-close passed on with shutdown(2), an error passed on as a reset.
//   base    as above: nginx's stream proxy's system calls, without its bookkeeping.
//   thread  one more thread, idle for the process's life. A process whose descriptor table has more
//           than one user pays for a reference on the descriptor in every system call on a socket
//           (the kernel's light lookup is only for a table with one user): what sluicegate's epoll
//           workers pay beside the control plane's threads.
//   held    quick ACKs off before the connect (TCP_QUICKACK 0), as sluicegate's epoll engine and
//           HAProxy's tcp-smart-connect do: the handshake's last ACK leaves with the first bytes.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "args.h"

#define BUF 16384
#define EVENTS 512

static int L_THREAD, L_HELD;
static int ep;

struct svc {
  int lfd;
  struct sockaddr_in be[MAX_BACKENDS];
  int nb;
  unsigned rr;
};

struct conn;
// One socket of a connection, as epoll names it: which connection, and which side.
struct end { struct conn *c; int backend; };
struct dir {
  int from, to;
  char buf[BUF];
  int len, off;  // bytes received and not yet sent: buf[off..len]
  int readable;  // an edge said there may be bytes (or a FIN) to read
  int rdhup;     // an edge said the peer's FIN is in: a short read no longer means empty
  int blocked;   // a send would block: retried on the writable edge, not before
  int eof, shut; // the FIN read; passed on
};
struct conn {
  struct end ce, be; // registered with epoll: the client's and the backend's sockets
  struct dir up, down;
  int cfd, bfd, connected, dead;
  struct conn *next_dead;
};

static struct conn *dead; // freed after the batch of events that may still name them

static void kill_conn(struct conn *c, int reset) {
  if (c->dead) return;
  c->dead = 1;
  if (reset) {
    struct linger l = {1, 0};
    setsockopt(c->cfd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    setsockopt(c->bfd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
  }
  close(c->cfd);
  close(c->bfd);
  c->next_dead = dead;
  dead = c;
}

// Moves what it can from `d->from` to `d->to`, until one would block. Returns -1 on an error.
static int pump(struct dir *d) {
  for (;;) {
    if (d->blocked) return 0;
    if (d->off < d->len) {
      ssize_t n = send(d->to, d->buf + d->off, d->len - d->off, MSG_NOSIGNAL);
      if (n < 0 && errno != EAGAIN) return -1;
      if (n > 0) d->off += n;
      if (d->off < d->len) { d->blocked = 1; return 0; }
    }
    d->off = d->len = 0;
    if (d->eof) {
      if (!d->shut) { d->shut = 1; shutdown(d->to, SHUT_WR); }
      return 0;
    }
    if (!d->readable) return 0;
    ssize_t n = recv(d->from, d->buf, BUF, 0);
    if (n > 0) {
      d->len = n;
      // A short read emptied the socket, unless the FIN is behind the bytes: the kernel returns
      // them first, and its edge came with theirs (nginx's pending_eof).
      if (n < BUF && !d->rdhup) d->readable = 0;
    } else if (n == 0) {
      d->eof = 1;
      d->readable = 0;
    } else if (errno == EAGAIN) {
      d->readable = 0;
      return 0;
    } else {
      return -1;
    }
  }
}

static void on_event(struct end *e, uint32_t ev) {
  struct conn *c = e->c;
  if (c->dead) return;
  if (e->backend && !c->connected) {
    int err = 0;
    socklen_t len = sizeof err;
    if (!(ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
    if (getsockopt(c->bfd, SOL_SOCKET, SO_ERROR, &err, &len) || err) { kill_conn(c, 1); return; }
    c->connected = 1;
    ev |= EPOLLOUT;
  }
  struct dir *in = e->backend ? &c->down : &c->up;
  if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) in->readable = 1;
  if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) in->rdhup = 1;
  if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) (e->backend ? &c->up : &c->down)->blocked = 0;
  if (!c->connected) return; // the client's bytes wait in its socket until the backend answers
  if (pump(&c->up) || pump(&c->down)) { kill_conn(c, 1); return; }
  if (c->up.shut && c->down.shut) kill_conn(c, 0);
}

static void on_accept(struct svc *sv) {
  int fd = accept4(sv->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd < 0) return;
  int one = 1, zero = 0;
  int b = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (b < 0) { close(fd); return; }
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (L_HELD) setsockopt(b, IPPROTO_TCP, TCP_QUICKACK, &zero, sizeof zero);
  struct sockaddr_in *to = &sv->be[sv->rr++ % sv->nb];
  if (connect(b, (void *)to, sizeof *to) && errno != EINPROGRESS) { close(b); close(fd); return; }
  struct conn *c = calloc(1, sizeof *c);
  if (!c) { close(b); close(fd); return; }
  c->cfd = fd; c->bfd = b;
  c->ce = (struct end){c, 0};
  c->be = (struct end){c, 1};
  c->up.from = fd; c->up.to = b;
  c->down.from = b; c->down.to = fd;
  struct epoll_event ce = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = &c->ce};
  struct epoll_event be = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = &c->be};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ce) || epoll_ctl(ep, EPOLL_CTL_ADD, b, &be)) kill_conn(c, 1);
}

static void *idle(void *arg) {
  for (;;) pause();
  return arg;
}

static int usage(void) {
  fprintf(stderr, "usage: epoll-proxy --levers base[+thread][+held] LISTEN=BACKEND[,BACKEND...] [LISTEN=...]\n");
  return 2;
}

int main(int argc, char **argv) {
  if (argc < 4 || strcmp(argv[1], "--levers")) return usage();
  const struct lever levers[] = {{"thread", &L_THREAD}, {"held", &L_HELD}, {0}};
  if (parse_levers("epoll-proxy", argv[2], levers)) return usage();
  signal(SIGPIPE, SIG_IGN);
  if (L_THREAD) {
    pthread_t t;
    if (pthread_create(&t, NULL, idle, NULL)) { fprintf(stderr, "epoll-proxy: no thread\n"); return 1; }
  }
  if ((ep = epoll_create1(EPOLL_CLOEXEC)) < 0) { perror("epoll-proxy: epoll_create1"); return 1; }
  int nsvc = argc - 3;
  struct svc *svcs = calloc(nsvc, sizeof *svcs);
  if (!svcs) return 1;
  for (int i = 0; i < nsvc; i++) {
    int ls = parse_service("epoll-proxy", argv[3 + i], SOCK_NONBLOCK | SOCK_CLOEXEC, svcs[i].be, &svcs[i].nb);
    if (ls == -2) return 1;
    if (ls < 0) return usage();
    svcs[i].lfd = ls;
    // The listener's epoll data is its svc; a connection's is an `end`. They are told apart by
    // address: the svcs are one array.
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = &svcs[i]};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, ls, &e)) { perror("epoll-proxy: epoll_ctl"); return 1; }
  }
  struct epoll_event evs[EVENTS];
  for (;;) {
    int n = epoll_wait(ep, evs, EVENTS, -1);
    for (int i = 0; i < n; i++) {
      void *p = evs[i].data.ptr;
      if (p >= (void *)svcs && p < (void *)(svcs + nsvc)) on_accept(p);
      else on_event(p, evs[i].events);
    }
    while (dead) { struct conn *c = dead; dead = c->next_dead; free(c); }
  }
}
