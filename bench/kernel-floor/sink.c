// A UDP receiver for udp_send: reads and drops datagrams until killed.
// Usage: sink IPV4 PORT
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>

int main(int argc, char **argv) {
  if (argc != 3) return 2;
  int s = socket(AF_INET, SOCK_DGRAM, 0), rcvbuf = 8 << 20;
  setsockopt(s, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
  if (inet_pton(AF_INET, argv[1], &a.sin_addr) != 1) return 2;
  if (bind(s, (void *)&a, sizeof a)) return 1;
  char b[2048];
  for (;;) recv(s, b, sizeof b, 0);
}
