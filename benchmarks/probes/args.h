// The probes' shared command line: `NAME --levers L1[+L2...] LISTEN=BACKEND[,BACKEND...] [LISTEN=...]`.
// Each probe keeps its own data path; only the parsing and the listening are shared.
#ifndef PROBE_ARGS_H
#define PROBE_ARGS_H
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define MAX_BACKENDS 16

struct lever { const char *name; int *on; };

// Sets the flag of every lever `list` names ("base" is every probe's and sets nothing); -1 on a
// name it does not know, reported on stderr.
static int parse_levers(const char *probe, char *list, const struct lever *levers) {
  for (char *l = strtok(list, "+"); l; l = strtok(NULL, "+")) {
    if (!strcmp(l, "base")) continue;
    const struct lever *v = levers;
    while (v->name && strcmp(v->name, l)) v++;
    if (!v->name) { fprintf(stderr, "%s: unknown lever %s\n", probe, l); return -1; }
    *v->on = 1;
  }
  return 0;
}

// "IP:PORT" (IPv4), the first n bytes of s.
static int parse_addr(const char *s, size_t n, struct sockaddr_in *a) {
  char h[64]; const char *c = memrchr(s, ':', n);
  if (!c || c - s >= (long)sizeof h) return -1;
  memcpy(h, s, c - s); h[c - s] = 0;
  memset(a, 0, sizeof *a);
  a->sin_family = AF_INET; a->sin_port = htons(atoi(c + 1));
  return inet_pton(AF_INET, h, &a->sin_addr) == 1 ? 0 : -1;
}

// "LISTEN=BACKEND[,BACKEND...]": a socket listening on LISTEN (SO_REUSEADDR, a backlog of 4096,
// `type_flags` added to its type) and one to MAX_BACKENDS backends. The listener; -1 for an
// argument it cannot read, -2 (reported on stderr) when the listen fails.
static int parse_service(const char *probe, char *arg, int type_flags, struct sockaddr_in *be, int *nb) {
  char *eq = strchr(arg, '=');
  struct sockaddr_in la;
  int one = 1;
  if (!eq || parse_addr(arg, eq - arg, &la)) return -1;
  for (char *b = strtok(eq + 1, ","); b && *nb < MAX_BACKENDS; b = strtok(NULL, ","))
    if (parse_addr(b, strlen(b), &be[(*nb)++])) return -1;
  if (*nb == 0) return -1;
  int ls = socket(AF_INET, SOCK_STREAM | type_flags, 0);
  if (ls >= 0) setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (ls < 0 || bind(ls, (void *)&la, sizeof la) || listen(ls, 4096)) {
    fprintf(stderr, "%s: listen on %.*s: ", probe, (int)(eq - arg), arg);
    perror(NULL);
    return -2;
  }
  return ls;
}
#endif
