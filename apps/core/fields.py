"""Encrypted model fields. PLACEHOLDER: being implemented."""

from django.db import models


class EncryptedTextField(models.TextField):
    pass
