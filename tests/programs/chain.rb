# A known Ruby call chain for the profiler's tests:
#   rb_outer -> rb_middle -> rb_inner (busy loop)
# Usage: ruby chain.rb SECONDS
def rb_inner(finish)
  x = 0
  while Process.clock_gettime(Process::CLOCK_MONOTONIC) < finish
    10_000.times { |i| x = (x * 31 + i) % 1_000_003 }
  end
  x
end

def rb_middle(finish)
  rb_inner(finish) + 1
end

def rb_outer(finish)
  rb_middle(finish) + 1
end

rb_outer(Process.clock_gettime(Process::CLOCK_MONOTONIC) + (ARGV[0] || 10).to_f)
