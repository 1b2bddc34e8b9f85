from django.urls import path

from inference_app import views

urlpatterns = [
    path("playground", views.playground, name="playground"),
]
