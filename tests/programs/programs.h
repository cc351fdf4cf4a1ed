/* What the C test programs share: calls that stay calls, and a clock. */
#ifndef PROGRAMS_H
#define PROGRAMS_H

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

#endif
