"""Admin pages that manage rows without letting staff rewrite what the worker owns.

A job's paths, hosts, pids, statuses and counts are written by services and the worker; a staff account that
could edit them could point "Download adapter" at the data directory (its database, its secret key). So every
field of these models is shown read-only, except the few a model lists in `editable_fields`, and rows are only
made by the services (no "Add" button). Actions and deletes still go through the services.
"""

from __future__ import annotations


class ReadOnlyFieldsAdmin:
    """A ModelAdmin mixin (put it first): every concrete field read-only but `editable_fields`; no add form."""

    editable_fields: tuple[str, ...] = ()

    def get_readonly_fields(self, request, obj=None):
        shown = list(super().get_readonly_fields(request, obj))
        hidden = set(self.get_exclude(request, obj) or ())
        for field in self.model._meta.concrete_fields:
            if field.name not in self.editable_fields and field.name not in hidden and field.name not in shown:
                shown.append(field.name)
        return shown

    def has_add_permission(self, request, obj=None) -> bool:
        return False
