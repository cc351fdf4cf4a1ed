/*
 * The driver bench/workload.c and bench/many_stacks.c share: command line, one
 * thread per worker, stop after the duration, join and sum. Each program keeps
 * its own work and worker_main (they are what gets sampled).
 *
 *   [--threads N] [--duration SECONDS]     N defaults to the online CPUs
 */
#ifndef BENCH_HARNESS_H
#define BENCH_HARNESS_H

#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Raised by run_workers when the duration is over; workers poll it. */
static atomic_int stop_flag;

struct worker {
    pthread_t thread;
    uint64_t seed;  /* set by run_workers */
    uint64_t count; /* units of work done, set by the worker when it stops */
    uint64_t sink;  /* a value derived from the work, so it cannot be optimized out */
    char pad[64];   /* keep workers on their own cache lines */
};

/* What run_workers measured. */
struct run {
    long threads;
    uint64_t total; /* sum of the workers' counts */
    uint64_t sink;  /* xor of their sinks */
    double elapsed; /* seconds from the first start to the last join */
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void usage(const char *argv0)
{
    fprintf(stderr, "usage: %s [--threads N] [--duration SECONDS]\n", argv0);
    exit(2);
}

/*
 * Parses the command line (default duration `default_duration` s), starts the
 * workers on `work`, worker i seeded with seed_of(i), raises stop_flag after the
 * duration and joins them. Exits 2 on a bad command line, returns non-zero when
 * a thread cannot be started.
 */
static int run_workers(int argc, char **argv, double default_duration, void *(*work)(void *),
                       uint64_t (*seed_of)(long i), struct run *out)
{
    long threads = sysconf(_SC_NPROCESSORS_ONLN);
    double duration = default_duration;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            threads = strtol(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--duration") == 0 && i + 1 < argc)
            duration = strtod(argv[++i], NULL);
        else
            usage(argv[0]);
    }
    if (threads < 1 || threads > 1024 || !(duration > 0))
        usage(argv[0]);

    struct worker *ws = calloc((size_t)threads, sizeof *ws);
    if (!ws) {
        perror("calloc");
        return 1;
    }
    double start = now_s();
    for (long i = 0; i < threads; i++) {
        ws[i].seed = seed_of(i);
        int err = pthread_create(&ws[i].thread, NULL, work, &ws[i]);
        if (err) {
            fprintf(stderr, "pthread_create: %s\n", strerror(err));
            return 1;
        }
    }
    struct timespec ts = { (time_t)duration, (long)((duration - (double)(time_t)duration) * 1e9) };
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
    atomic_store(&stop_flag, 1);
    *out = (struct run){ .threads = threads };
    for (long i = 0; i < threads; i++) {
        pthread_join(ws[i].thread, NULL);
        out->total += ws[i].count;
        out->sink ^= ws[i].sink;
    }
    out->elapsed = now_s() - start;
    free(ws);
    return 0;
}

#endif
