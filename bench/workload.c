/*
 * CPU-bound workload for bench/overhead.py.
 *
 *   gcc -O2 -fno-omit-frame-pointer -pthread -o workload workload.c
 *   ./workload [--threads N] [--duration SECONDS]
 *
 * Starts N worker threads (default: number of online CPUs). Each runs the same
 * fixed amount of work per iteration (an integer mixing loop reached through a
 * chain of non-inlined calls plus a short recursion, so sampled stacks are about
 * ten frames deep) until the main thread raises the stop flag after SECONDS.
 * Prints one line:
 *
 *   iterations=<total> elapsed=<seconds> threads=<N> rate=<iterations per second>
 *
 * The work per iteration never varies, so the rate is the throughput figure.
 */
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

/* noipa: keep every call a real call (no inlining, cloning or tail-recursion elimination). */
#define NOINLINE __attribute__((noinline, noipa))
#define MIX_ROUNDS 48
#define RECURSION_DEPTH 4

static atomic_int stop_flag;

struct worker {
    pthread_t thread;
    uint64_t seed;
    uint64_t iterations;
    uint64_t sink;
    char pad[64];
};

/* Leaf: a fixed number of multiply/xor-shift rounds (splitmix/LCG style). */
NOINLINE static uint64_t mix_leaf(uint64_t x)
{
    for (int i = 0; i < MIX_ROUNDS; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        x ^= x >> 29;
        x *= 0xbf58476d1ce4e5b9ULL;
        x ^= x >> 32;
    }
    return x;
}

/* Short non-tail recursion to make the stacks a little deeper. */
NOINLINE static uint64_t descend(uint64_t x, int depth)
{
    if (depth == 0)
        return mix_leaf(x);
    uint64_t r = descend(x ^ (uint64_t)depth, depth - 1);
    return (r ^ (r >> 17)) + (x >> 7);
}

NOINLINE static uint64_t stage_c(uint64_t x) { return descend(x, RECURSION_DEPTH) ^ 0x9e3779b97f4a7c15ULL; }
NOINLINE static uint64_t stage_b(uint64_t x) { return stage_c(x + 0x632be59bd9b4e019ULL) * 3; }
NOINLINE static uint64_t stage_a(uint64_t x) { return stage_b(x ^ (x << 13)) + 1; }

NOINLINE static void *worker_main(void *arg)
{
    struct worker *w = arg;
    uint64_t x = w->seed, n = 0;
    while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
        x = stage_a(x);
        n++;
    }
    w->iterations = n;
    w->sink = x;
    return NULL;
}

static double now(void)
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

int main(int argc, char **argv)
{
    long threads = sysconf(_SC_NPROCESSORS_ONLN);
    double duration = 20.0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = strtol(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--duration") && i + 1 < argc)
            duration = strtod(argv[++i], NULL);
        else
            usage(argv[0]);
    }
    if (threads < 1 || duration <= 0)
        usage(argv[0]);

    struct worker *workers = calloc((size_t)threads, sizeof(*workers));
    if (!workers) {
        perror("calloc");
        return 1;
    }
    double start = now();
    for (long i = 0; i < threads; i++) {
        workers[i].seed = 0x243f6a8885a308d3ULL + (uint64_t)i;
        int err = pthread_create(&workers[i].thread, NULL, worker_main, &workers[i]);
        if (err) {
            fprintf(stderr, "pthread_create: %s\n", strerror(err));
            return 1;
        }
    }

    struct timespec ts = {(time_t)duration, (long)((duration - (double)(time_t)duration) * 1e9)};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
    atomic_store(&stop_flag, 1);

    uint64_t total = 0, sink = 0;
    for (long i = 0; i < threads; i++) {
        pthread_join(workers[i].thread, NULL);
        total += workers[i].iterations;
        sink ^= workers[i].sink;
    }
    double elapsed = now() - start;
    printf("iterations=%llu elapsed=%.6f threads=%ld rate=%.3f sink=%llx\n",
           (unsigned long long)total, elapsed, threads, (double)total / elapsed,
           (unsigned long long)sink);
    return 0;
}
