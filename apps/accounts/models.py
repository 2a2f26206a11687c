from django.contrib.auth.models import AbstractUser


class User(AbstractUser):
    """The platform's user. A person belongs to owners through `owners.Membership`."""

    class Meta:
        db_table = "accounts_user"
