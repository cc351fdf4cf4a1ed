import threading


def inner(n):
    s = 0
    for i in range(n):
        s += i * i
    return s


def outer():
    while True:
        inner(10000)


class Worker:
    def run(self):
        outer()


t = threading.Thread(target=Worker().run, name="worker", daemon=True)
t.start()
Worker().run()
