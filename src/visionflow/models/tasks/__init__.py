"""Task plug-ins: what differs between classification and detection, behind one interface."""

from visionflow.models.tasks.base import Task, get_task, register_task
from visionflow.models.tasks.classification import ClassificationTask
from visionflow.models.tasks.detection import DetectionTask

__all__ = ["ClassificationTask", "DetectionTask", "Task", "get_task", "register_task"]
