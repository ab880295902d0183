"""cornserve.resource_manager: device inventory, deduplicated deployments, task-manager processes."""

__version__ = "0.1.0"
