class Worker
  def work(n)
    s = 0
    n.times { |i| s += i * i }
    s
  end

  def run
    loop do
      work(10_000)
      sleep 0.001 if rand < 0.05
    end
  end
end

t = Thread.new { Worker.new.run }
Worker.new.run
