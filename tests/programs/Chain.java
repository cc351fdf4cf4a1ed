// A known Java call chain for the profiler's tests, run with
// -XX:+PreserveFramePointer so JIT-compiled frames can be walked:
//   main -> javaOuter -> javaMiddle -> javaInner (busy loop)
// Usage: java Chain SECONDS
public class Chain {
    static long javaInner(long x) {
        for (int i = 0; i < 100_000; i++) {
            x = x * 6364136223846793005L + 1442695040888963407L;
        }
        return x;
    }

    static long javaMiddle(long x) { return javaInner(x) + 1; }

    static long javaOuter(long x) { return javaMiddle(x) + 1; }

    public static void main(String[] args) {
        long end = System.nanoTime() + (long) (Double.parseDouble(args.length > 0 ? args[0] : "10") * 1e9);
        long sink = 1;
        while (System.nanoTime() < end) {
            sink = javaOuter(sink);
        }
        System.out.println(sink == 42 ? "" : "done");
    }
}
