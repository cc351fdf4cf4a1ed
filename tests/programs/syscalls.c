/* Spends its time in the kernel: reads /dev/zero in large chunks.
 *   main -> read_zero_loop -> [kernel: read]
 * The syscall is issued inline: Debian's libc has no frame pointers, so going
 * through its read() would hide read_zero_loop from a frame-pointer walk.
 * Usage: syscalls SECONDS */
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "programs.h"

static char buf[1 << 20];

static long sys_read(int fd, void *p, unsigned long n)
{
#if defined(__x86_64__)
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(0L /* SYS_read */), "D"((long)fd), "S"(p), "d"(n)
                     : "rcx", "r11", "memory");
    return ret;
#else
    return read(fd, p, n);
#endif
}

NOINLINE long read_zero_loop(int fd, double end)
{
    long total = 0;
    while (now() < end)
        for (int i = 0; i < 64; i++)
            total += sys_read(fd, buf, sizeof buf);
    return total;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 5;
    int fd = open("/dev/zero", O_RDONLY);
    if (fd < 0)
        return 1;
    return read_zero_loop(fd, now() + seconds) > 0 ? 0 : 1;
}
