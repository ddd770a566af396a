from bridge.entry import run

run()
