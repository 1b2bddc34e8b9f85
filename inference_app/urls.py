from django.urls import path

from inference_app import api, views

urlpatterns = [
    path("playground", views.playground, name="playground"),
    path("usage", views.usage, name="usage"),
    path("api/inference", api.InferenceApi.as_view(), name="api-inference"),
    path("v1/models", api.ModelsApi.as_view(), name="openai-models"),
    path("v1/chat/completions", api.ChatCompletionsApi.as_view(), name="openai-chat-completions"),
    path("v1/completions", api.CompletionsApi.as_view(), name="openai-completions"),
]
