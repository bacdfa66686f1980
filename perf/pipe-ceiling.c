// The fastest simple consumer of a stream on stdin that we know how to write, for perf/bench.ts: what any
// `exec:` program could reach on this machine, as a ceiling next to fio (which reads no pipe).
//
//   pipe-ceiling OUT        (built by the bench: cc -O2 pipe-ceiling.c -luring)
//
// It grows the pipe to 1 MiB, reads stdin in 1 MiB pieces into 32 page-aligned buffers, and keeps up to 16 O_DIRECT
// writes of them in flight through io_uring. OUT's blocks are allocated ahead (fallocate, as snap-pipe save does;
// where refused, OUT is sized sparse with ftruncate) and the file is cut to length at the end. No parsing, no
// checksums, no second copy: one read() copy per byte, as snap-pipe's reader also pays.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BUF_BYTES (1 << 20)
#define BUFS 32
#define DEPTH 16
#define SIZE_AHEAD (1L << 30)

static int busy[BUFS];   // 1 while a write from the buffer is in flight
static unsigned expect[BUFS]; // bytes of that write

static void die(const char *what, int err) {
  fprintf(stderr, "pipe-ceiling: %s: %s\n", what, strerror(err));
  exit(1);
}

static int reap(struct io_uring *ring, int wait) {
  struct io_uring_cqe *cqe;
  int done = 0;
  for (;;) {
    int r = wait && done == 0 ? io_uring_wait_cqe(ring, &cqe) : io_uring_peek_cqe(ring, &cqe);
    if (r == -EAGAIN) return done;
    if (r == -EINTR) continue;
    if (r < 0) die("io_uring wait", -r);
    if (cqe->res < 0) die("write", -cqe->res);
    unsigned i = (unsigned)cqe->user_data;
    if ((unsigned)cqe->res != expect[i]) die("short write", EIO);
    busy[i] = 0;
    io_uring_cqe_seen(ring, cqe);
    done++;
  }
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: pipe-ceiling OUT < stream\n");
    return 2;
  }
  fcntl(0, F_SETPIPE_SZ, BUF_BYTES); // best effort, as snap-pipe does
  int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT, 0644);
  if (fd < 0) die(argv[1], errno);
  struct io_uring ring;
  int r = io_uring_queue_init(2 * DEPTH, &ring, 0);
  if (r < 0) die("io_uring_queue_init", -r);
  char *mem;
  if (posix_memalign((void **)&mem, 4096, (size_t)BUF_BYTES * BUFS) != 0) die("posix_memalign", ENOMEM);

  long offset = 0, sized = 0;
  int in_flight = 0;
  for (unsigned next = 0;; next++) {
    unsigned i = next % BUFS;
    while (busy[i]) in_flight -= reap(&ring, 1);
    char *buf = mem + (size_t)i * BUF_BYTES;
    size_t got = 0;
    while (got < BUF_BYTES) {
      ssize_t n = read(0, buf + got, BUF_BYTES - got);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) die("read", errno);
      if (n == 0) break;
      got += (size_t)n;
    }
    if (got == 0) break;
    size_t len = (got + 4095) & ~(size_t)4095; // the tail is padded, like an image cluster
    memset(buf + got, 0, len - got);
    if (offset + (long)len > sized) {
      long ahead = offset + (long)len + SIZE_AHEAD;
      if (fallocate(fd, 0, sized, ahead - sized) < 0 && ftruncate(fd, ahead) < 0) die("ftruncate", errno);
      sized = ahead;
    }
    while (in_flight >= DEPTH) in_flight -= reap(&ring, 1);
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    io_uring_prep_write(sqe, fd, buf, (unsigned)len, offset);
    sqe->user_data = i;
    busy[i] = 1;
    expect[i] = (unsigned)len;
    r = io_uring_submit(&ring);
    if (r < 0) die("io_uring_submit", -r);
    in_flight++;
    offset += (long)len;
    in_flight -= reap(&ring, 0);
    if (got < BUF_BYTES) break;
  }
  while (in_flight > 0) in_flight -= reap(&ring, 1);
  if (ftruncate(fd, offset) < 0) die("ftruncate", errno);
  if (fdatasync(fd) < 0) die("fdatasync", errno);
  close(fd);
  io_uring_queue_exit(&ring);
  return 0;
}
