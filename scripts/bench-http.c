/* The one listener of scripts/bench's connection-rate runs: a minimal HTTP responder.
 *
 * Listens on 0.0.0.0:PORT with IP_TRANSPARENT (so nftables tproxy may hand it connections
 * too), forks WORKERS processes that each accept a connection, read the request, answer
 * "200 ok" with Connection: close, wait for the client to close (so TIME_WAIT stays on the
 * client, which may reuse its ports, and not on this side, where it would stall SYNs that reuse
 * a 4-tuple), and close. Every process exits by itself after LIFETIME seconds.
 *
 *   bench-http PORT WORKERS LIFETIME     prints the parent's pid once it listens
 */
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#ifndef IP_TRANSPARENT
#define IP_TRANSPARENT 19
#endif

static const char reply[] =
	"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s PORT WORKERS LIFETIME\n", argv[0]);
		return 2;
	}
	int port = atoi(argv[1]), workers = atoi(argv[2]), lifetime = atoi(argv[3]);
	int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	if (s < 0 || setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    setsockopt(s, IPPROTO_IP, IP_TRANSPARENT, &one, sizeof(one)) ||
	    bind(s, (struct sockaddr *)&a, sizeof(a)) || listen(s, 4096)) {
		perror("bench-http: listen");
		return 1;
	}
	printf("%d\n", getpid());
	fflush(stdout);
	for (int i = 1; i < workers; i++)
		if (fork() == 0)
			break;
	alarm(lifetime); /* not inherited across fork: set in every process */
	char buf[4096];
	for (;;) {
		int c = accept(s, NULL, NULL);
		if (c < 0)
			continue;
		struct timeval tv = {.tv_sec = 1};
		setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
		if (read(c, buf, sizeof(buf)) > 0 && write(c, reply, sizeof(reply) - 1) > 0)
			while (read(c, buf, sizeof(buf)) > 0)
				;
		close(c);
	}
}
