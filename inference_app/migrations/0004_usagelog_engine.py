from django.db import migrations, models


def answered_by_transformers(apps, schema_editor):
    """Every call answered before this migration was answered by transformers, the only engine then."""
    UsageLog = apps.get_model("inference_app", "UsageLog")
    UsageLog.objects.filter(status="ok").update(engine="transformers")


class Migration(migrations.Migration):
    dependencies = [
        ("inference_app", "0003_usagelog_finish_reason"),
    ]

    operations = [
        migrations.AddField(
            model_name="usagelog",
            name="engine",
            field=models.CharField(blank=True, max_length=16),
        ),
        migrations.RunPython(answered_by_transformers, migrations.RunPython.noop),
    ]
