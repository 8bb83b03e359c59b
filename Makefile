# Convenience targets; the scripts in scripts/ do the work. Run as root.
.PHONY: deps run test

deps:
	./scripts/setup

run:
	./scripts/run-plugin

test:
	./scripts/run-tests $(PYTEST_ARGS)
