/* SPDX-License-Identifier: MIT */
/*
 * The ringcore C core without Python: forked producers call rc_output() per
 * 64-byte record, the parent consumes with rc_consume(). Prints records/s
 * for 1 and 2 producers, with the consumer as Ring.poll() runs it (a 20 us
 * coalescing nap, then sleep on the eventfd: default wakeups) and
 * busy-polling.
 *
 *   usage: c_bench [records per run]
 */
#define _GNU_SOURCE
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ringcore.h"

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int count_cb(void *ctx, uint64_t pos, const void *data, uint32_t size)
{
	(void)pos;
	(void)data;
	*(uint64_t *)ctx += size == 64;
	return 0;
}

/* a forked producer: its own mapping, with the producer's permissions */
static void produce(struct rc_ring *consumer, uint64_t n)
{
	struct rc_ring r;
	char rec[64];

	if (rc_attach(&r, consumer->mem_fd, consumer->event_fd,
		      RC_ROLE_PRODUCER)) {
		perror("rc_attach");
		_exit(1);
	}
	memset(rec, 'r', sizeof(rec));
	for (uint64_t i = 0; i < n;)
		if (rc_output(&r, rec, sizeof(rec), 0) == 0)
			i++;
}

static double run(int producers, uint64_t total, int busy)
{
	struct rc_ring r;
	uint64_t got = 0;
	double start;
	int i;

	if (rc_create(&r, 1 << 22, RC_ROLE_CONSUMER, 0)) {
		perror("rc_create");
		exit(1);
	}
	start = now();
	for (i = 0; i < producers; i++)
		if (fork() == 0) {
			produce(&r, total / producers);
			_exit(0);
		}
	while (got < total) {
		if (rc_consume(&r, count_cb, &got, 0) > 0)
			continue;
		if (busy) {
			/* as Ring.poll(busy_poll=True): check, then back off so
			 * the spinning consumer leaves the producer's lines alone */
			while (!rc_ready(&r))
				for (int j = 0; j < 16; j++)
					rc_cpu_relax();
			continue;
		}
		/* as Ring.poll(): nap 20 us unannounced, then sleep */
		nanosleep(&(struct timespec){0, 20000}, NULL);
		if (rc_ready(&r))
			continue;
		if (rc_prepare_wait(&r)) {
			struct pollfd pfd = {r.event_fd, POLLIN, 0};

			poll(&pfd, 1, 1000);
			rc_finish_wait(&r);
		}
	}
	start = total / (now() - start);
	while (wait(NULL) > 0)
		;
	rc_close(&r);
	return start;
}

int main(int argc, char **argv)
{
	uint64_t n = argc > 1 ? strtoull(argv[1], NULL, 10) : 10000000;

	for (int p = 1; p <= 2; p++) {
		printf("  C rc_output(), %d producer(s), 64 B, default wakeups: %6.2f M records/s\n",
		       p, run(p, n, 0) / 1e6);
		printf("  C rc_output(), %d producer(s), 64 B, busy-poll:       %6.2f M records/s\n",
		       p, run(p, n, 1) / 1e6);
	}
	return 0;
}
