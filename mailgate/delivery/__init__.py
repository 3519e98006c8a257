"""Storing and handing off accepted mail: Maildir, mbox, mailer pipe, LMTP, smarthost."""
