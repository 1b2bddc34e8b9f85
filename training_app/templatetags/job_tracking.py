"""{% job_tracking job as tracking %}: what the job page's Tracking block shows (training_app.tracking.tracking_view)."""

from django import template

from training_app.tracking import tracking_view

register = template.Library()


@register.simple_tag
def job_tracking(job):
    return tracking_view(job)
