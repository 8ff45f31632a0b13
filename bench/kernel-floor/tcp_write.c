// Kernel cost of answering held requests: accepts N connections, then 6 times (200 ms apart)
// writes one SIZE-byte response to each in turn, the least work an HTTP origin can do per
// answer. Prints wall and system time per write for each pass.
// Usage: tcp_write PORT N SIZE LABEL
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}
static double us(struct timeval t) { return t.tv_sec * 1e6 + t.tv_usec; }

int main(int argc, char **argv) {
  if (argc != 5) return 2;
  int n = atoi(argv[2]), size = atoi(argv[3]), one = 1;
  int l = socket(AF_INET, SOCK_STREAM, 0);
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
  if (bind(l, (void *)&a, sizeof a) || listen(l, 4096)) return 1;
  int *fd = malloc(n * sizeof *fd);
  for (int i = 0; i < n; i++) {
    fd[i] = accept(l, 0, 0);
    setsockopt(fd[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  char *buf = malloc(size);
  memset(buf, 'a', size);
  for (int pass = 0; pass < 6; pass++) {
    usleep(200000);
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    double t0 = now_us();
    for (int i = 0; i < n; i++)
      if (write(fd[i], buf, size) != size) return 1;
    double t1 = now_us();
    getrusage(RUSAGE_SELF, &r1);
    printf("%-28s tcp write pass %d: %d x %d B, wall %.2f us, sys %.2f us per write\n", argv[4],
           pass, n, size, (t1 - t0) / n, (us(r1.ru_stime) - us(r0.ru_stime)) / n);
  }
  return 0;
}
