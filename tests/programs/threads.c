/* Threads with their own names, for the profiler's thread-name tests.
 *
 *   threads SECONDS          two threads, alpha_thread (in alpha_leaf) and
 *                            beta_thread (in beta_leaf), pinned to one CPU so that
 *                            they take turns on it: consecutive samples of that CPU
 *                            switch threads.
 *   threads SECONDS rename   one thread named "before" (in before_leaf) that
 *                            renames itself "after" half-way and then runs
 *                            after_leaf: it stays on its CPU across the rename.
 *
 * Busy for SECONDS, then exits 0. Built with -fno-omit-frame-pointer. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "programs.h"

static double seconds;

#define LEAF(name)                                                           \
    NOINLINE uint64_t name(uint64_t x)                                       \
    {                                                                        \
        for (int i = 0; i < 200000; i++)                                     \
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;         \
        return x;                                                            \
    }
LEAF(alpha_leaf)
LEAF(beta_leaf)
LEAF(before_leaf)
LEAF(after_leaf)

static uint64_t spin_until(double end, uint64_t (*leaf)(uint64_t))
{
    uint64_t x = 1;
    while (now() < end)
        x = leaf(x);
    return x;
}

static void *alpha(void *end)
{
    pthread_setname_np(pthread_self(), "alpha_thread");
    return (void *)(uintptr_t)spin_until(*(double *)end, alpha_leaf);
}

static void *beta(void *end)
{
    pthread_setname_np(pthread_self(), "beta_thread");
    return (void *)(uintptr_t)spin_until(*(double *)end, beta_leaf);
}

static void *renaming(void *end)
{
    double stop = *(double *)end;
    pthread_setname_np(pthread_self(), "before");
    spin_until(stop - seconds / 2, before_leaf);
    pthread_setname_np(pthread_self(), "after");
    return (void *)(uintptr_t)spin_until(stop, after_leaf);
}

int main(int argc, char **argv)
{
    seconds = argc > 1 ? atof(argv[1]) : 5;
    int rename = argc > 2 && strcmp(argv[2], "rename") == 0;
    double end = now() + seconds;
    pthread_t a, b;
    if (rename) {
        pthread_create(&a, NULL, renaming, &end);
        pthread_join(a, NULL);
        return 0;
    }
    /* Pin to the first CPU we may run on; the threads inherit it. */
    cpu_set_t set;
    sched_getaffinity(0, sizeof set, &set);
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
        if (CPU_ISSET(cpu, &set)) {
            CPU_ZERO(&set);
            CPU_SET(cpu, &set);
            break;
        }
    }
    sched_setaffinity(0, sizeof set, &set);
    pthread_create(&a, NULL, alpha, &end);
    pthread_create(&b, NULL, beta, &end);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    return 0;
}
