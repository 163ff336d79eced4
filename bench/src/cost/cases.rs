//! Part 1's cases: each a frame, the program it runs through, and what
//! its output must be.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Case {
    Pass,
    PassSingle,
    NewFresh,
    /// The client's ACK that completes a fresh handshake (its SYN and the
    /// backend's SYN-ACK run untimed first): the record moves from the
    /// half-open table to `FLOWS`.
    CompleteFresh,
    EstablishedSingle,
    Established,
    Udp,
    Reply,
    NonVip,
    StatelessNewFresh,
    StatelessNew,
    StatelessEstablished,
    StatelessReply,
    TcEstablished,
    TcReply,
    TcNonVip,
    /// The IPv6 baselines: XDP_PASS on the IPv6 frames.
    Pass6,
    Pass6Single,
    New6Fresh,
    Established6Single,
    Established6,
    Udp6,
    Reply6,
    NonVip6,
    TcEstablished6,
    TcReply6,
}

impl Case {
    pub(super) fn key(self) -> &'static str {
        match self {
            Case::Pass => "xdp_pass",
            Case::PassSingle => "xdp_pass_repeat1",
            Case::NewFresh => "new_tcp_flow_cold",
            Case::CompleteFresh => "handshake_completion_cold",
            Case::EstablishedSingle => "established_tcp_cold",
            Case::Established => "established_tcp",
            Case::Udp => "udp",
            Case::Reply => "backend_reply",
            Case::NonVip => "non_vip",
            Case::StatelessNewFresh => "stateless_new_tcp_flow_cold",
            Case::StatelessNew => "stateless_new_tcp_flow",
            Case::StatelessEstablished => "stateless_established_tcp",
            Case::StatelessReply => "stateless_backend_reply",
            Case::TcEstablished => "tc_established_tcp",
            Case::TcReply => "tc_backend_reply",
            Case::TcNonVip => "tc_non_vip",
            Case::Pass6 => "ipv6_xdp_pass",
            Case::Pass6Single => "ipv6_xdp_pass_repeat1",
            Case::New6Fresh => "ipv6_new_tcp_flow_cold",
            Case::Established6Single => "ipv6_established_tcp_cold",
            Case::Established6 => "ipv6_established_tcp",
            Case::Udp6 => "ipv6_udp",
            Case::Reply6 => "ipv6_backend_reply",
            Case::NonVip6 => "ipv6_non_vip",
            Case::TcEstablished6 => "ipv6_tc_established_tcp",
            Case::TcReply6 => "ipv6_tc_backend_reply",
        }
    }
    pub(super) fn label(self) -> &'static str {
        match self {
            Case::Pass => "XDP_PASS baseline (repeat N)",
            Case::PassSingle => "XDP_PASS baseline (repeat 1)",
            Case::NewFresh => "new TCP flow (SYN, fresh 5-tuple), cold: repeat 1",
            Case::CompleteFresh => {
                "the client's ACK completing a fresh handshake (record moved to FLOWS), cold: repeat 1"
            }
            Case::EstablishedSingle => "established TCP packet, cold: repeat 1",
            Case::Established => "established TCP packet",
            Case::Udp => "UDP packet (established flow)",
            Case::Reply => "backend reply",
            Case::NonVip => "non-VIP packet",
            Case::StatelessNewFresh => {
                "stateless service: new TCP flow (SYN, fresh 5-tuple), cold: repeat 1"
            }
            Case::StatelessNew => "stateless service: new TCP flow (SYN)",
            Case::StatelessEstablished => "stateless service: established TCP packet",
            Case::StatelessReply => "stateless service: backend reply",
            Case::TcEstablished => "TC program: established TCP packet",
            Case::TcReply => "TC program: backend reply",
            Case::TcNonVip => "TC program: non-VIP packet",
            Case::Pass6 => "IPv6: XDP_PASS baseline (repeat N)",
            Case::Pass6Single => "IPv6: XDP_PASS baseline (repeat 1)",
            Case::New6Fresh => "IPv6: new TCP flow (SYN, fresh 5-tuple), cold: repeat 1",
            Case::Established6Single => "IPv6: established TCP packet, cold: repeat 1",
            Case::Established6 => "IPv6: established TCP packet",
            Case::Udp6 => "IPv6: UDP packet (established flow)",
            Case::Reply6 => "IPv6: backend reply",
            Case::NonVip6 => "IPv6: non-VIP packet",
            Case::TcEstablished6 => "IPv6, TC program: established TCP packet",
            Case::TcReply6 => "IPv6, TC program: backend reply",
        }
    }
    pub(super) fn single(self) -> bool {
        matches!(
            self,
            Case::PassSingle
                | Case::NewFresh
                | Case::CompleteFresh
                | Case::EstablishedSingle
                | Case::StatelessNewFresh
                | Case::Pass6Single
                | Case::New6Fresh
                | Case::Established6Single
        )
    }
    pub(super) fn baseline(self) -> bool {
        matches!(
            self,
            Case::Pass | Case::PassSingle | Case::Pass6 | Case::Pass6Single
        )
    }
    /// The XDP_PASS case this case's cost is taken over: the same family's
    /// frames, the same repeat.
    pub(super) fn base(self) -> Case {
        let v6 = matches!(
            self,
            Case::New6Fresh
                | Case::Established6Single
                | Case::Established6
                | Case::Udp6
                | Case::Reply6
                | Case::NonVip6
                | Case::TcEstablished6
                | Case::TcReply6
        );
        match (v6, self.single()) {
            (false, false) => Case::Pass,
            (false, true) => Case::PassSingle,
            (true, false) => Case::Pass6,
            (true, true) => Case::Pass6Single,
        }
    }
}
