from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("evaluation_app", "0008_job_statuses"),
    ]

    operations = [
        migrations.AddField(
            model_name="evaluationexample",
            name="tools",
            field=models.JSONField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="evaluationexample",
            name="reference_calls",
            field=models.JSONField(blank=True, default=list),
        ),
    ]
