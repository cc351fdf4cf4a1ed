/* Functions inlined into their caller, for the profiler's source lines:
 *   main -> inl_outer, which has inl_middle inlined, which has inl_inner inlined.
 * The hot loop's addresses are in inl_outer's code; DWARF says they are inl_inner's,
 * at the line marked LINE_INNER, called from inl_middle at LINE_MIDDLE, called from
 * inl_outer at LINE_OUTER. GCC inlines always_inline functions even at -O0.
 * Usage: inlined SECONDS   (busy for SECONDS, then exits 0) */
#include <stdint.h>
#include <stdlib.h>

#include "programs.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE uint64_t inl_inner(uint64_t x)
{
    for (int i = 0; i < 1000000; i++) x = x * 6364136223846793005ULL + 1442695040888963407ULL; /* LINE_INNER */
    return x;
}

ALWAYS_INLINE uint64_t inl_middle(uint64_t x)
{
    return inl_inner(x) + 1; /* LINE_MIDDLE */
}

NOINLINE uint64_t inl_outer(uint64_t x)
{
    return inl_middle(x) + 1; /* LINE_OUTER */
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 5;
    double end = now() + seconds;
    volatile uint64_t sink = 1;
    while (now() < end)
        sink = inl_outer(sink);
    return 0;
}
