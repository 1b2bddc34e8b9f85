from django.urls import path

from inference_app import views
from inference_app.api import engine_check, openai, seed

urlpatterns = [
    path("playground", views.playground, name="playground"),
    path("usage", views.usage, name="usage"),
    path("api/inference", seed.InferenceApi.as_view(), name="api-inference"),
    path("api/training/<int:pk>/engine-check", engine_check.TrainingJobEngineCheckApi.as_view(), name="api-training-engine-check"),
    path("v1/models", openai.ModelsApi.as_view(), name="openai-models"),
    path("v1/chat/completions", openai.ChatCompletionsApi.as_view(), name="openai-chat-completions"),
    path("v1/completions", openai.CompletionsApi.as_view(), name="openai-completions"),
]
