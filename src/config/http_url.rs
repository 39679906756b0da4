//! An absolute `http(s)` URL (an OAuth2 `token_url`, a Vault `url`, an IMDS
//! `endpoint`), split into what a dispatched call needs (`:authority`, `:path`).
//!
//! Deliberately strict and small rather than a general URL parser: `url::Url`
//! brings IDNA tables that cost about 130 KB of the module for fields that each
//! name one endpoint. Host names must be ASCII (punycode for IDNs); no user info
//! (credentials belong in `client_id`/`client_secret`), no fragment. A default
//! port (80 for http, 443 for https) is dropped from the authority, as HTTP
//! clients send it.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub authority: String,
    pub path: String,
}

/// Why a URL was refused; `Display` is the reason shown after the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlError {
    NotAbsolute,
    Scheme,
    Credentials,
    Host,
    Port,
    Fragment,
    Characters,
}

impl std::fmt::Display for UrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UrlError::NotAbsolute => {
                "not an absolute URL (expected http://host/path or https://host/path)"
            }
            UrlError::Scheme => "scheme must be http or https",
            UrlError::Credentials => "must not carry credentials; use client_id and client_secret",
            UrlError::Host => "not a valid host (use an ASCII name, IPv4 or [IPv6] address)",
            UrlError::Port => "not a valid port",
            UrlError::Fragment => "must not have a #fragment",
            UrlError::Characters => {
                "has spaces, control or non-ASCII characters (percent-encode them)"
            }
        })
    }
}

pub fn parse(url: &str) -> Result<HttpUrl, UrlError> {
    if !url.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(UrlError::Characters);
    }
    let (scheme, rest) = url.split_once("://").ok_or(UrlError::NotAbsolute)?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return Err(UrlError::Scheme),
    };
    if rest.contains('#') {
        return Err(UrlError::Fragment);
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.contains('@') {
        return Err(UrlError::Credentials);
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or(UrlError::Host)?;
        if addr.is_empty()
            || !addr
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err(UrlError::Host);
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(UrlError::Port)?),
        };
        (format!("[{}]", addr.to_ascii_lowercase()), port)
    } else {
        let (h, p) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        let valid = !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
            && !h.starts_with(['.', '-']);
        if !valid {
            return Err(UrlError::Host);
        }
        (h.to_ascii_lowercase(), p)
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
            _ => return Err(UrlError::Port),
        },
    };
    let authority = match port {
        Some(p) if p != default_port => format!("{host}:{p}"),
        _ => host,
    };
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    Ok(HttpUrl { authority, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(url: &str) -> (String, String) {
        let t = parse(url).unwrap();
        (t.authority, t.path)
    }

    #[test]
    fn splits_authority_and_path() {
        assert_eq!(
            ok("http://idp.internal:8081/token"),
            ("idp.internal:8081".into(), "/token".into())
        );
        assert_eq!(
            ok("https://IdP.Example.com/oauth2/v2.0/token?x=1"),
            ("idp.example.com".into(), "/oauth2/v2.0/token?x=1".into())
        );
        assert_eq!(ok("https://idp:443/t"), ("idp".into(), "/t".into()));
        assert_eq!(ok("http://idp:80"), ("idp".into(), "/".into()));
        assert_eq!(ok("http://idp?x"), ("idp".into(), "/?x".into()));
        assert_eq!(
            ok("HTTPS://10.0.0.1:8443/t"),
            ("10.0.0.1:8443".into(), "/t".into())
        );
        assert_eq!(
            ok("http://[::1]:9000/t"),
            ("[::1]:9000".into(), "/t".into())
        );
        assert_eq!(ok("http://[FE80::1]/t"), ("[fe80::1]".into(), "/t".into()));
    }

    #[test]
    fn refuses_what_is_not_an_http_endpoint() {
        for (url, err) in [
            ("idp.internal/token", UrlError::NotAbsolute),
            ("ftp://idp/token", UrlError::Scheme),
            ("https://u:p@idp/token", UrlError::Credentials),
            ("https://u@idp/token", UrlError::Credentials),
            ("https:///token", UrlError::Host),
            ("https://idp..x!/t", UrlError::Host),
            ("https://-idp/t", UrlError::Host),
            ("https://[zz]/t", UrlError::Host),
            ("https://[::1/t", UrlError::Host),
            ("https://idp:0/t", UrlError::Port),
            ("https://idp:99999/t", UrlError::Port),
            ("https://idp:+80/t", UrlError::Port),
            ("https://idp:/t", UrlError::Port),
            ("https://idp/t#frag", UrlError::Fragment),
            ("https://idp/t t", UrlError::Characters),
            ("https://idé/t", UrlError::Characters),
        ] {
            assert_eq!(parse(url), Err(err), "{url}");
        }
    }
}
