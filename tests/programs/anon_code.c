/* Spins in code it wrote into anonymous executable memory, as a JIT would, and prints
 * that code's address (hex) on its first line. Runs until killed.
 */
#include <stdio.h>
#include <sys/mman.h>

int main(void)
{
    unsigned char *code = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (code == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    code[0] = 0xeb; /* jmp . (x86-64: a two-byte jump to itself) */
    code[1] = 0xfe;
    printf("%lx\n", (unsigned long)code);
    fflush(stdout);
    ((void (*)(void))code)();
    return 0;
}
