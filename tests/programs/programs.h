/* What the C test programs share: calls that stay calls, and a clock. */
#ifndef PROGRAMS_H
#define PROGRAMS_H

#include <stdint.h>
#include <time.h>

/* noipa: keep every call a real call (no inlining, cloning or tail-call elimination). */
#define NOINLINE __attribute__((noinline, noipa))

/* Seconds on the monotonic clock. */
__attribute__((unused)) static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Busy work until `until` on the monotonic clock, inlined into the caller so it
 * adds no frame: the caller is the leaf a test looks for. */
__attribute__((unused, always_inline)) static inline uint64_t busy_until(double until)
{
    uint64_t x = 1;
    while (now() < until)
        for (int i = 0; i < 10000; i++)
            x = x * 6364136223846793005ULL + 1;
    return x;
}

#endif
