from django.urls import path

from evaluation_app import views

urlpatterns = [
    path("evaluations", views.evaluation_list, name="evaluation-list"),
    path("evaluations/<int:pk>", views.evaluation_detail, name="evaluation-detail"),
]
