"""django-q2's admin pages, made safe: the admin manages rows, it never runs code in the worker.

django-q2 registers a Schedule admin in which a staff account can schedule any importable function
(`subprocess.getoutput` included) for the worker to call, and a "Resubmit" action that runs a stored task
again. This site's worker schedules nothing from the database (its periodic work is code in the supervisor), so
the Schedule admin is removed, and the task history (successes, failures, the queue) is kept read-only, without
actions.
"""

from django.contrib import admin
from django_q import admin as q_admin
from django_q.models import Failure, OrmQ, Schedule, Success

for model in (Schedule, Success, Failure, OrmQ):
    if admin.site.is_registered(model):
        admin.site.unregister(model)


class ReadOnly:
    """Look, never add, change, delete or resubmit (django-q2's own list columns and filters are kept)."""

    actions = None

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Success)
class SuccessAdmin(ReadOnly, q_admin.TaskAdmin):
    pass


@admin.register(Failure)
class FailureAdmin(ReadOnly, q_admin.FailAdmin):
    pass


@admin.register(OrmQ)
class QueueAdmin(ReadOnly, q_admin.QueueAdmin):
    pass
