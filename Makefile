# Convenience targets; the scripts in scripts/ do the work. Run as root.
.PHONY: deps run test plugin

deps:
	./scripts/setup

run:
	./scripts/run-plugin

test:
	./scripts/run-tests $(PYTEST_ARGS)

# The managed plugin, built without a registry and created on the engine
# DOCKER_HOST names: make plugin [PLUGIN_NAME=pyoverlay:dev]
plugin:
	./packaging/build-plugin $(PLUGIN_NAME)
