/* A user stack walk that cannot go on: spin_bad_fp spins with a misaligned value in
 * the frame-pointer register, as code built without frame pointers may leave any
 * value there. main -> spin_bad_fp; the walk of a sample in the loop stops at once.
 * Usage: badfp SECONDS   (busy for SECONDS, then exits 0) */
#include <stdint.h>
#include <stdlib.h>

#include "programs.h"

NOINLINE void spin_bad_fp(long n)
{
    /* rbp is kept in r12 and restored: no memory is touched meanwhile. */
    __asm__ volatile(
        "mov %%rbp, %%r12\n\t"
        "mov $0x1235, %%rbp\n\t"
        "1: dec %0\n\t"
        "jnz 1b\n\t"
        "mov %%r12, %%rbp"
        : "+r"(n)
        :
        : "r12", "cc");
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 5;
    double end = now() + seconds;
    while (now() < end)
        spin_bad_fp(10000000);
    return 0;
}
