// The players for tcp_write: N connections read with epoll until killed.
// Usage: tcp_read IPV4 PORT N
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc != 4) return 2;
  int n = atoi(argv[3]), ep = epoll_create1(0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
  if (inet_pton(AF_INET, argv[1], &a.sin_addr) != 1) return 2;
  for (int i = 0; i < n; i++) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (void *)&a, sizeof a)) return 1;
    fcntl(s, F_SETFL, O_NONBLOCK);
    struct epoll_event e = {.events = EPOLLIN, .data.fd = s};
    epoll_ctl(ep, EPOLL_CTL_ADD, s, &e);
  }
  struct epoll_event ev[256];
  char b[4096];
  for (;;) {
    int k = epoll_wait(ep, ev, 256, -1);
    for (int i = 0; i < k; i++)
      while (read(ev[i].data.fd, b, sizeof b) > 0) {
      }
  }
}
