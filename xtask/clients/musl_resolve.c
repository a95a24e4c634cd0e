/* A client that resolves with musl's getaddrinfo, for the testbed (built by
 * xtask::testbed::clients::musl_resolve with `musl-gcc -static`).
 *
 * musl's resolver sends the A and AAAA queries in parallel from one unconnected UDP socket
 * (sendto/recvfrom), and drops replies whose source is not the nameserver it asked: what the
 * load balancer's UDP hooks must get right.
 *
 *   musl_resolve [-4|-6] NAME [--http PORT]
 *
 * Prints each address on its own line (in getaddrinfo's order). With --http, connects to the
 * first one and prints the body of `GET /` (HTTP/1.0). Exit status: 0 on success, 2 when the
 * name does not resolve, 3 when the HTTP exchange fails, 64 on bad usage. */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static int usage(void) {
	fprintf(stderr, "usage: musl_resolve [-4|-6] NAME [--http PORT]\n");
	return 64;
}

static int http_get(const struct addrinfo *ai, const char *host, int port) {
	struct sockaddr_storage addr;
	memcpy(&addr, ai->ai_addr, ai->ai_addrlen);
	if (addr.ss_family == AF_INET)
		((struct sockaddr_in *)&addr)->sin_port = htons(port);
	else
		((struct sockaddr_in6 *)&addr)->sin6_port = htons(port);
	int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		perror("socket");
		return 3;
	}
	struct timeval timeout = {.tv_sec = 2};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
	if (connect(fd, (struct sockaddr *)&addr, ai->ai_addrlen) < 0) {
		perror("connect");
		return 3;
	}
	char request[512];
	int len = snprintf(request, sizeof request, "GET / HTTP/1.0\r\nHost: %s\r\n\r\n", host);
	if (len < 0 || (size_t)len >= sizeof request || write(fd, request, len) != len) {
		perror("write");
		return 3;
	}
	static char response[65536];
	size_t got = 0;
	ssize_t n = 0;
	while (got < sizeof response - 1 && (n = read(fd, response + got, sizeof response - 1 - got)) > 0)
		got += n;
	if (n < 0) {
		perror("read");
		return 3;
	}
	response[got] = 0;
	char *body = strstr(response, "\r\n\r\n");
	if (!body) {
		fprintf(stderr, "not an HTTP answer: %s\n", response);
		return 3;
	}
	fputs(body + 4, stdout);
	close(fd);
	return 0;
}

int main(int argc, char **argv) {
	int family = AF_UNSPEC, port = 0;
	const char *name = NULL;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "-4"))
			family = AF_INET;
		else if (!strcmp(argv[i], "-6"))
			family = AF_INET6;
		else if (!strcmp(argv[i], "--http") && i + 1 < argc)
			port = atoi(argv[++i]);
		else if (argv[i][0] != '-' && !name)
			name = argv[i];
		else
			return usage();
	}
	if (!name || port < 0 || port > 65535)
		return usage();
	/* A hard bound, whatever the resolver's and the connection's timeouts add up to. */
	alarm(20);

	struct addrinfo hints = {.ai_family = family, .ai_socktype = SOCK_STREAM};
	struct addrinfo *result;
	int rc = getaddrinfo(name, NULL, &hints, &result);
	if (rc) {
		fprintf(stderr, "%s: %s\n", name, gai_strerror(rc));
		return 2;
	}
	for (struct addrinfo *ai = result; ai; ai = ai->ai_next) {
		char text[INET6_ADDRSTRLEN];
		const void *addr = ai->ai_family == AF_INET
			? (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr
			: (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr;
		if (inet_ntop(ai->ai_family, addr, text, sizeof text))
			printf("%s\n", text);
	}
	fflush(stdout);
	rc = port ? http_get(result, name, port) : 0;
	freeaddrinfo(result);
	return rc;
}
