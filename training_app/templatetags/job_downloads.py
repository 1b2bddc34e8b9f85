"""{% job_base_weights job as base %}: the base the job was trained on, for the download offered beside its adapter."""

from django import template

from training_app.selectors import base_weights

register = template.Library()


@register.simple_tag
def job_base_weights(job):
    return base_weights(job)
