// A known JavaScript call chain for the profiler's tests, run with
// node --perf-basic-prof (writes /tmp/perf-PID.map):
//   jsOuter -> jsMiddle -> jsInner (busy loop)
// Usage: node --perf-basic-prof --no-turbo-inlining chain.js SECONDS
// (without the second flag V8 may inline the chain into the main loop).
function jsInner(x) {
  for (let i = 0; i < 100000; i++) {
    x = (x * 31 + i) % 1000003;
  }
  return x;
}
function jsMiddle(x) { return jsInner(x) + 1; }
function jsOuter(x) { return jsMiddle(x) + 1; }

const end = Date.now() + 1000 * Number(process.argv[2] || 10);
let sink = 1;
while (Date.now() < end) {
  sink = jsOuter(sink);
}
if (sink === 42) console.log("");
