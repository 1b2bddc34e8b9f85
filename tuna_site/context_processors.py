from django.conf import settings


def tuna(request):
    return {"gpu_hourly_usd": settings.TUNA_GPU_HOURLY_USD}
