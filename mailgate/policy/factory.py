"""Builds the policy engine from the configuration.

Step order matters, since the first refusal wins and later steps read what earlier
ones recorded: the client's DNS name (for the trace and the log), the hop count (a
mail loop is refused whoever sends it), the access list (whose ``allow`` rules excuse
a client from the DNSBL), the DNSBL, the clients that talked before the greeting,
the HELO checks, sender verification, recipients and relay control, greylisting
(last of the built-in checks, so only mail that would otherwise be accepted is
delayed), then the site's own steps.
"""

from __future__ import annotations

from collections.abc import Sequence

from mailgate.config.schema import Config
from mailgate.policy.access import AccessStep
from mailgate.policy.base import Mailboxes, Step
from mailgate.policy.dns import Resolver
from mailgate.policy.dnsbl import DnsblStep
from mailgate.policy.engine import PolicyEngine
from mailgate.policy.helo import HeloStep
from mailgate.policy.hops import HopCountStep
from mailgate.policy.networks import NetworkList
from mailgate.policy.pregreet import PregreetStep
from mailgate.policy.recipient import RecipientStep
from mailgate.policy.reverse import ReverseNameStep
from mailgate.policy.sender import SenderDomainStep


def build_policy(
    config: Config,
    mailboxes: Mailboxes,
    hostname: str,
    local_names: list[str] | None = None,
    *,
    extra_steps: Sequence[Step] = (),
) -> PolicyEngine:
    """The engine for ``config``.  Raises ValueError on a bad access file or DNS setup."""
    policy = config.policy
    trusted = NetworkList.parse(policy.trusted_networks, "policy.trusted_networks")
    resolver = None
    if policy.dnsbl_zones or policy.verify_sender_domain or policy.reverse_lookup:
        resolver = Resolver(policy.dns_servers, policy.dns_timeout)
    steps: list[Step] = []
    recipients = RecipientStep(mailboxes, hostname, policy.allow_loopback_literal)
    if resolver is not None and policy.reverse_lookup:
        steps.append(ReverseNameStep(resolver))
    steps.append(HopCountStep(policy.max_received_headers))
    if policy.access_file:
        # A refusal names postmaster@ a domain we take mail for: the host name need not
        # be one (mx.example.org serving example.org).
        contact = getattr(mailboxes, "postmaster_domain", "") or hostname
        steps.append(
            AccessStep(
                policy.access_file, contact, policy.blocked_disposition, policy.quarantine_dir,
                local_forms=recipients.local_forms,
            )
        )
    if resolver is not None and policy.dnsbl_zones:
        steps.append(DnsblStep(resolver, policy.dnsbl_zones))
    if config.server.greet_pause > 0:
        steps.append(PregreetStep())
    if policy.helo_checks:
        # A client claiming our mail domain is lying as much as one claiming our host
        # name (upas refused its -h domain too).
        names = [*policy.local_names, *config.delivery.local_domains, *(local_names or [])]
        steps.append(HeloStep(hostname, names, policy.helo_refusal, policy.helo_literal_must_match))
    if resolver is not None and policy.verify_sender_domain:
        steps.append(SenderDomainStep(resolver))
    steps.append(recipients)
    if config.greylist.enabled:
        # imported here so a server without greylisting never loads its storage backends
        from mailgate.policy.greylist import build_greylist

        steps.append(build_greylist(config.greylist))
    steps.extend(extra_steps)
    return PolicyEngine(steps, trusted)
