// Kernel cost of sending small UDP datagrams with sendmmsg(2), batches of 64, to one receiver:
// the per-datagram floor under an SFU's fan-out. Prints system and user CPU per datagram.
// Usage: udp_send IPV4 PORT COUNT LABEL
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>

static double us(struct timeval t) { return t.tv_sec * 1e6 + t.tv_usec; }

int main(int argc, char **argv) {
  if (argc != 5) return 2;
  int s = socket(AF_INET, SOCK_DGRAM, 0);
  int sndbuf = 8 << 20;
  setsockopt(s, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
  struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
  if (inet_pton(AF_INET, argv[1], &to.sin_addr) != 1) return 2;
  char payload[121];
  memset(payload, 1, sizeof payload);
  struct mmsghdr msgs[64];
  struct iovec iov[64];
  for (int i = 0; i < 64; i++) {
    iov[i] = (struct iovec){payload, sizeof payload};
    memset(&msgs[i], 0, sizeof msgs[i]);
    msgs[i].msg_hdr.msg_name = &to;
    msgs[i].msg_hdr.msg_namelen = sizeof to;
    msgs[i].msg_hdr.msg_iov = &iov[i];
    msgs[i].msg_hdr.msg_iovlen = 1;
  }
  long count = atol(argv[3]), sent = 0;
  struct rusage r0, r1;
  getrusage(RUSAGE_SELF, &r0);
  for (long k = 0; k < count / 64; k++) {
    int n = sendmmsg(s, msgs, 64, 0);
    if (n > 0) sent += n;
  }
  getrusage(RUSAGE_SELF, &r1);
  if (sent == 0) return 1;
  printf("%-28s udp sendmmsg: %ld datagrams of %zu B, sys %.2f us + user %.2f us per datagram\n",
         argv[4], sent, sizeof payload, (us(r1.ru_stime) - us(r0.ru_stime)) / sent,
         (us(r1.ru_utime) - us(r0.ru_utime)) / sent);
  return 0;
}
