from django.http import HttpResponse, JsonResponse
from django.urls import path


def index(request):
    return HttpResponse("Hello from Django")


def echo(request):
    return JsonResponse({"method": request.method, "body": request.body.decode(), "path": request.path})


urlpatterns = [path("", index), path("echo", echo)]
