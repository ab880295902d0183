"""cornserve.resource_manager: device inventory, deduplicated deployments, task-manager processes."""

from importlib.metadata import version

__version__ = version("cornserve-resource-manager")
