// The bench's floor: a minimal HTTP/1.1 server in C that answers every request
// with one fixed answer, the exact bytes nmi's fast path gave the bench (its Date
// frozen). One thread, level-triggered epoll, keep-alive, TCP_NODELAY, no
// parsing beyond finding where each request's head ends. It does the least any
// server must do per request (read, find the end, write), so the native fast
// path is measured against what the kernel and the network cost.
//
//   cc -O2 -o constant bench/constant.c && ./constant <answer-file> <host> <port> [close]
//
// Prints `listening <port>` once it listens (port 0: any free one). Requests
// must have no body (the bench sends GETs). Connections stay open until the
// client closes them, or with `close` (the bench's --churn) until the first
// answer is written; SIGTERM ends the process.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_HEAD 8192
#define MAX_EVENTS 64

struct conn {
  int fd;
  size_t in_len;
  char in[MAX_HEAD];
  char *out;  // answers not yet written (the socket buffer was full)
  size_t out_len, out_off, out_cap;
  int out_armed;  // EPOLLOUT is being watched
};

static char *answer;
static size_t answer_len;
static int close_after_answer;
static int epfd;

static void die(const char *what) {
  perror(what);
  exit(1);
}

static char *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) die(path);
  size_t cap = 4096, n = 0;
  char *buf = malloc(cap);
  size_t got;
  while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
    n += got;
    if (n == cap) buf = realloc(buf, cap *= 2);
  }
  fclose(f);
  *len = n;
  return buf;
}

static void close_conn(struct conn *c) {
  close(c->fd);  // also leaves the epoll set
  free(c->out);
  free(c);
}

static void watch(struct conn *c, unsigned events) {
  struct epoll_event ev = {.events = events, .data.ptr = c};
  if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl");
}

// Writes what is pending; returns -1 when the connection is dead.
static int flush_out(struct conn *c) {
  while (c->out_off < c->out_len) {
    ssize_t n = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!c->out_armed) watch(c, EPOLLIN | EPOLLOUT);
      c->out_armed = 1;
      return 0;
    }
    if (n <= 0) return -1;
    c->out_off += (size_t)n;
  }
  if (close_after_answer && c->out_len > 0) return -1;  // answered: the connection ends
  if (c->out_armed) watch(c, EPOLLIN);
  c->out_armed = 0;
  c->out_len = c->out_off = 0;
  return 0;
}

static void queue_answer(struct conn *c) {
  if (c->out_len + answer_len > c->out_cap) {
    c->out_cap = (c->out_len + answer_len) * 2;
    c->out = realloc(c->out, c->out_cap);
  }
  memcpy(c->out + c->out_len, answer, answer_len);
  c->out_len += answer_len;
}

// One answer per complete request head; a partial head waits for more bytes.
static int on_readable(struct conn *c) {
  for (;;) {
    size_t room = MAX_HEAD - c->in_len;
    ssize_t n = read(c->fd, c->in + c->in_len, room);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (n <= 0) return -1;
    c->in_len += (size_t)n;
    size_t start = 0;
    char *end;
    while ((end = memmem(c->in + start, c->in_len - start, "\r\n\r\n", 4)) != NULL) {
      queue_answer(c);
      start = (size_t)(end - c->in) + 4;
    }
    memmove(c->in, c->in + start, c->in_len - start);
    c->in_len -= start;
    if (c->in_len == MAX_HEAD) return -1;  // a head larger than we take
    if ((size_t)n < room) break;           // short read: the socket is empty
  }
  return c->out_len > c->out_off ? flush_out(c) : 0;
}

static void on_accept(int listener) {
  for (;;) {
    int fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;  // EAGAIN: accepted everything waiting
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct conn *c = calloc(1, sizeof *c);
    c->fd = fd;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
  }
}

static int listen_on(const char *host, int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) die("socket");
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
    fprintf(stderr, "not an IPv4 address: %s\n", host);
    exit(2);
  }
  if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
  if (listen(fd, 511) < 0) die("listen");
  socklen_t len = sizeof addr;
  getsockname(fd, (struct sockaddr *)&addr, &len);
  printf("listening %d\n", ntohs(addr.sin_port));
  fflush(stdout);
  return fd;
}

int main(int argc, char **argv) {
  close_after_answer = argc == 5 && strcmp(argv[4], "close") == 0;
  if (argc != 4 && !close_after_answer) {
    fprintf(stderr, "usage: %s <answer-file> <host> <port> [close]\n", argv[0]);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  answer = read_file(argv[1], &answer_len);
  epfd = epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0) die("epoll_create1");
  int listener = listen_on(argv[2], atoi(argv[3]));
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, listener, &ev) < 0) die("epoll_ctl");
  struct epoll_event events[MAX_EVENTS];
  for (;;) {
    int n = epoll_wait(epfd, events, MAX_EVENTS, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) die("epoll_wait");
    for (int i = 0; i < n; i++) {
      struct conn *c = events[i].data.ptr;
      if (c == NULL) {
        on_accept(listener);
        continue;
      }
      int dead = (events[i].events & (EPOLLERR | EPOLLHUP)) != 0;
      if (!dead && (events[i].events & EPOLLOUT)) dead = flush_out(c) < 0;
      if (!dead && (events[i].events & EPOLLIN)) dead = on_readable(c) < 0;
      if (dead) close_conn(c);
    }
  }
}
