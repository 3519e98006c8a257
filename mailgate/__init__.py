"""mailgate: a strict, fast ESMTP server descended from Plan 9's upas smtpd."""

__version__ = "0.1.0"
