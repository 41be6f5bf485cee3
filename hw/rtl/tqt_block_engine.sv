// A small integer-only accelerator composed from the units: it runs a program of ops (a Transformer
// block's requantizes, matmuls, softmaxes, ReLU, residual adds and LayerNorms, hw/block.py writes it
// from an export's golden vectors) on a scratchpad of 64-bit words holding weights and activations.
//
// Each instruction is FIELDS 64-bit words (hw/block.py names them):
//   0 op   1 dst   2 a   3 b   4 c   5 rows   6 depth   7 width
//   8 a_row_stride   9 a_step   10 b_step   11 b_column_step   12 dst_row_stride   13 dst_column_step
//   14 shift   15 extra
// op 1 requantize: dst[n] = clip(shift_round(a[n], shift)) onto ACT_W bits, signed unless extra = 1
//                 (n < depth)
// op 2 matmul:    dst[r, j] = sum_i a[r a_row_stride + i a_step] b[i b_step + j b_column_step] (+ c[j]
//                 unless c < 0), at dst + r dst_row_stride + j dst_column_step; LANES columns at a time
// op 3 softmax:   row r of `depth` scores at a + r a_row_stride, every key visible, onto dst (shift =
//                 f - F, extra = the clamp)
// op 4 relu:      dst[n] = max(a[n], 0)
// op 5 residual:  dst[n] = clip(shift_round((a[n] << a_row_stride) + (b[n] << a_step), shift))
// op 6 layernorm: row r of D_LN values at a + r a_row_stride, gamma at b, beta at c, onto dst + r
//                 dst_row_stride (shift = the output shift, extra = eps_q)
// op 0 ends the program. The scratchpad answers reads one cycle after the address (ports a: one
// address; b and c: LANES addresses) and takes up to LANES writes a cycle.
module tqt_block_engine #(
    parameter int LANES = 16,
    parameter int ADDR_W = 24,
    parameter int ROUNDING = 2,
    parameter int ACT_W = 8,       // the activation sites (requantize outputs, matmul inputs: ACT_W + 1)
    parameter int W_W = 8,
    parameter int ACC_W = 32,
    parameter int RES_W = 16,      // the residual stream (LayerNorm inputs and outputs)
    parameter int SUM_W = 40,      // the residual add's exact sum
    // the LayerNorm unit (hw/params.py)
    parameter int LN_D = 64, parameter int LN_ADDR_W = 6, parameter int LN_GAMMA_W = 16,
    parameter int LN_BETA_W = 49, parameter int LN_EPS_W = 33, parameter int LN_K = 24, parameter int LN_F = 16,
    parameter int LN_S_W = 23, parameter int LN_SQ_W = 37, parameter int LN_W_W = 43, parameter int LN_C_W = 23,
    parameter int LN_NUM_W = 44, parameter int LN_N_Q_W = 20, parameter int LN_Y_W = 40,
    parameter bit LN_RECIPROCAL = 0, parameter int LN_G = 24,
    // the softmax unit (hw/params.py)
    parameter int SM_LEN_W = 8, parameter int SM_SC_W = 22, parameter int SM_X_W = 24, parameter int SM_XF_W = 27,
    parameter int SM_Z_IN_W = 26, parameter int SM_Z_W = 9, parameter int SM_L_W = 38, parameter int SM_S_W = 47,
    parameter int SM_B_P = 8, parameter int SM_MAX_LEFT = 0, parameter longint SM_Q_LN2 = 64'd181704,
    parameter longint SM_Q_B = 64'd354684, parameter longint SM_Q_C = 64'd66012017480,
    parameter longint SM_MAGIC = 0, parameter int SM_MAGIC_S = 0, parameter bit SM_RECIPROCAL = 0
) (
    input  logic                      clk,
    input  logic                      rst,
    input  logic                      start,
    output logic [15:0]               pc,           // the instruction to fetch (read one cycle later)
    input  logic [16*64-1:0]          instruction,
    output logic [ADDR_W-1:0]         rd_a_addr,
    input  logic signed [63:0]        rd_a,
    output logic [LANES*ADDR_W-1:0]   rd_b_addr,
    /* verilator lint_off UNUSEDSIGNAL */  // the units read the low bits of each 64-bit word
    input  logic [LANES*64-1:0]       rd_b,
    output logic [LANES*ADDR_W-1:0]   rd_c_addr,
    input  logic [LANES*64-1:0]       rd_c,
    /* verilator lint_on UNUSEDSIGNAL */
    output logic [LANES-1:0]          wr_en,
    output logic [LANES*ADDR_W-1:0]   wr_addr,
    output logic [LANES*64-1:0]       wr_data,
    output logic                      done
);
  localparam int SHIFT_W = 8;
  typedef enum logic [3:0] {IDLE, FETCH, DECODE, ELEMENTWISE, MATMUL, ROW_START, ROW_WAIT, FINISHED} state_t;
  state_t state;

  // the instruction's fields
  logic signed [63:0] field [16];
  always_ff @(posedge clk) if (state == DECODE) for (int f = 0; f < 16; f++) field[f] <= instruction[f*64 +: 64];
  wire [3:0] op = field[0][3:0];
  wire signed [63:0] dst = field[1], a = field[2], b = field[3], c = field[4], rows = field[5];
  wire signed [63:0] depth = field[6], width = field[7], a_row = field[8], a_step = field[9];
  wire signed [63:0] b_step = field[10], b_column = field[11], dst_row = field[12], dst_column = field[13];
  wire signed [SHIFT_W-1:0] shift = field[14][SHIFT_W-1:0];
  wire signed [63:0] extra = field[15];

  // ---- the units ----
  // requantize (ACT_W bits, signed or unsigned), ReLU and the residual add: one element a cycle
  logic [ACT_W-1:0] requantized_signed, requantized_unsigned;
  logic signed [ACT_W-1:0] requantized_as_signed;
  logic signed [63:0] requantized_wide;  // sign-extended
  assign requantized_as_signed = requantized_signed;
  assign requantized_wide = requantized_as_signed;
  tqt_shift_round #(.IN_W(64), .OUT_W(ACT_W), .OUT_SIGNED(1), .ROUNDING(ROUNDING), .SHIFT_W(SHIFT_W))
      requantize_signed (.q(rd_a), .shift(shift), .out(requantized_signed));
  tqt_shift_round #(.IN_W(64), .OUT_W(ACT_W), .OUT_SIGNED(0), .ROUNDING(ROUNDING), .SHIFT_W(SHIFT_W))
      requantize_unsigned (.q(rd_a), .shift(shift), .out(requantized_unsigned));
  logic signed [63:0] relu_out;
  tqt_relu #(.W(64)) relu (.acc(rd_a), .out(relu_out));
  logic signed [RES_W-1:0] residual_out;
  logic signed [63:0] residual_wide;
  assign residual_wide = residual_out;  // sign-extended
  tqt_residual #(.X_W(RES_W), .A_W(ACC_W), .SUM_W(SUM_W), .OUT_W(RES_W), .ROUNDING(ROUNDING), .SHIFT_W(SHIFT_W))
      residual (.x(rd_a[RES_W-1:0]), .a(rd_b[ACC_W-1:0]), .x_shift(a_row[SHIFT_W-1:0]),
                .a_shift(a_step[SHIFT_W-1:0]), .shift(shift), .out(residual_out));

  // the MAC row
  logic mac_valid, mac_first, mac_last, mac_done;
  logic signed [ACT_W:0] mac_x;
  logic [LANES*W_W-1:0] mac_w;
  logic [LANES*ACC_W-1:0] mac_bias, mac_acc;
  /* verilator lint_off UNUSEDSIGNAL */
  logic [LANES*ACT_W-1:0] mac_q;  // unused: a matmul's requantize is an op of its own (as in the spec)
  /* verilator lint_on UNUSEDSIGNAL */
  logic signed [63:0] acc_wide [LANES];
  for (genvar l = 0; l < LANES; l++) begin : unpack
    logic signed [ACC_W-1:0] lane;
    assign lane = mac_acc[l*ACC_W +: ACC_W];
    assign acc_wide[l] = lane;  // sign-extended
  end
  tqt_mac_row #(.LANES(LANES), .X_W(ACT_W + 1), .W_W(W_W), .ACC_W(ACC_W), .OUT_W(ACT_W), .ROUNDING(ROUNDING))
      mac (.clk(clk), .in_valid(mac_valid), .first(mac_first), .last(mac_last), .x(mac_x), .w(mac_w),
           .bias(mac_bias), .shift({LANES*SHIFT_W{1'b0}}), .out_valid(mac_done), .acc(mac_acc), .q(mac_q));

  // the LayerNorm and softmax row units, reading through port a (and b, c for gamma and beta)
  logic ln_start, ln_done, ln_valid, sm_start, sm_done, sm_valid;
  logic [LN_ADDR_W-1:0] ln_addr, ln_out_addr;
  logic signed [RES_W-1:0] ln_out;
  logic signed [63:0] ln_wide;
  assign ln_wide = ln_out;  // sign-extended
  tqt_layer_norm_row #(.D(LN_D), .ADDR_W(LN_ADDR_W), .IN_W(RES_W), .GAMMA_W(LN_GAMMA_W), .BETA_W(LN_BETA_W),
                       .EPS_W(LN_EPS_W), .OUT_W(RES_W), .K(LN_K), .F(LN_F), .ROUNDING(ROUNDING), .S_W(LN_S_W),
                       .SQ_W(LN_SQ_W), .W_W(LN_W_W), .C_W(LN_C_W), .NUM_W(LN_NUM_W), .N_Q_W(LN_N_Q_W),
                       .Y_W(LN_Y_W), .SHIFT_W(SHIFT_W), .RECIPROCAL(LN_RECIPROCAL), .G(LN_G))
      layer_norm (.clk(clk), .rst(rst), .start(ln_start), .eps_q(extra[LN_EPS_W-1:0]), .out_shift(shift),
                  .rd_addr(ln_addr), .rd_q(rd_a[RES_W-1:0]), .rd_gamma(rd_b[LN_GAMMA_W-1:0]),
                  .rd_beta(rd_c[LN_BETA_W-1:0]), .out_valid(ln_valid), .out_addr(ln_out_addr), .out_q(ln_out),
                  .done(ln_done), .row_s(), .row_w(), .row_k(), .row_root(), .row_r(), .out_c(), .out_n(),
                  .out_y());
  logic [SM_LEN_W-1:0] sm_addr, sm_out_addr;
  logic [SM_B_P-1:0] sm_out;
  tqt_softmax_row #(.LEN_W(SM_LEN_W), .SC_W(SM_SC_W), .X_W(SM_X_W), .XF_W(SM_XF_W), .Z_IN_W(SM_Z_IN_W),
                    .Z_W(SM_Z_W), .L_W(SM_L_W), .S_W(SM_S_W), .B_P(SM_B_P), .ROUNDING(ROUNDING), .SHIFT_W(SHIFT_W),
                    .MAX_LEFT(SM_MAX_LEFT), .Q_LN2(SM_Q_LN2), .Q_B(SM_Q_B), .Q_C(SM_Q_C), .MAGIC(SM_MAGIC),
                    .MAGIC_S(SM_MAGIC_S), .RECIPROCAL(SM_RECIPROCAL))
      softmax (.clk(clk), .rst(rst), .start(sm_start), .len(depth[SM_LEN_W-1:0]), .clamp(extra[SM_X_W-1:0]),
               .shift(shift), .rd_addr(sm_addr), .rd_score(rd_a[SM_SC_W-1:0]), .rd_visible(1'b1),
               .out_valid(sm_valid), .out_addr(sm_out_addr), .out_p(sm_out), .done(sm_done), .row_sum(), .row_t(), .row_r(),
               .out_x(), .out_x_f(), .out_z(), .out_l(), .out_e());

  // ---- the sequencer ----
  logic signed [63:0] r, i, j, n;       // row, pair, first column of the lane group, element
  logic signed [63:0] n_read, out_r, out_j, mac_r, mac_j;  // what the data now arriving belongs to
  logic reading, busy_read;
  wire row_unit = op == 3 || op == 6;
  wire signed [63:0] row_base = a + r * a_row;

  always_comb begin
    rd_a_addr = '0;
    rd_b_addr = '0;
    rd_c_addr = '0;
    if (state == ELEMENTWISE) begin
      rd_a_addr = ADDR_W'(a + n);
      rd_b_addr[0 +: ADDR_W] = ADDR_W'(b + n);
    end else if (state == MATMUL) begin
      rd_a_addr = ADDR_W'(a + r * a_row + i * a_step);
      for (int l = 0; l < LANES; l++) begin
        rd_b_addr[l*ADDR_W +: ADDR_W] = ADDR_W'(b + i * b_step + (j + l) * b_column);
        rd_c_addr[l*ADDR_W +: ADDR_W] = ADDR_W'(c + j + l);
      end
    end else if (row_unit) begin
      rd_a_addr = ADDR_W'(row_base + (op == 3 ? 64'(sm_addr) : 64'(ln_addr)));
      rd_b_addr[0 +: ADDR_W] = ADDR_W'(b + 64'(ln_addr));
      rd_c_addr[0 +: ADDR_W] = ADDR_W'(c + 64'(ln_addr));
    end
  end

  always_ff @(posedge clk) begin
    wr_en <= '0;
    done <= 0;
    ln_start <= 0;
    sm_start <= 0;
    mac_valid <= 0;
    if (rst) begin
      state <= IDLE;
      pc <= 0;
    end else begin
      case (state)
        IDLE: if (start) begin
          pc <= 0;
          state <= FETCH;
        end
        FETCH: state <= DECODE;  // the instruction arrives
        DECODE: begin
          state <= instruction[3:0] == 0 ? FINISHED
                 : instruction[3:0] == 2 ? MATMUL
                 : instruction[3:0] == 3 || instruction[3:0] == 6 ? ROW_START : ELEMENTWISE;
          r <= 0;
          i <= 0;
          j <= 0;
          n <= 0;
          reading <= 0;
          busy_read <= 1;
        end
        ELEMENTWISE: begin  // address n now; element n - 1's data arrives and is written
          reading <= busy_read;
          n_read <= n;
          if (busy_read) begin
            if (n == depth - 1) busy_read <= 0;
            else n <= n + 1;
          end
          if (reading) begin
            wr_en[0] <= 1;
            wr_addr[0 +: ADDR_W] <= ADDR_W'(dst + n_read);
            wr_data[0 +: 64] <= op == 1 ? (extra == 1 ? 64'(requantized_unsigned) : requantized_wide)
                              : op == 4 ? relu_out : residual_wide;
          end
          if (!busy_read && reading) begin
            pc <= pc + 1;
            state <= FETCH;
          end
        end
        MATMUL: begin  // the pair (r, i, j) addressed now; the previous cycle's pair goes into the MAC row
          mac_valid <= busy_read;
          mac_first <= i == 0;
          mac_last <= i == depth - 1;
          mac_r <= r;
          mac_j <= j;
          if (busy_read) begin
            if (i < depth - 1) i <= i + 1;
            else begin
              i <= 0;
              if (j + LANES < width) j <= j + LANES;
              else begin
                j <= 0;
                if (r < rows - 1) r <= r + 1;
                else busy_read <= 0;
              end
            end
          end
          out_r <= mac_r;  // the pair in the MAC row now: its results come out next cycle
          out_j <= mac_j;
          if (mac_done) begin
            for (int l = 0; l < LANES; l++) begin
              wr_en[l] <= out_j + l < width;
              wr_addr[l*ADDR_W +: ADDR_W] <= ADDR_W'(dst + out_r * dst_row + (out_j + l) * dst_column);
              wr_data[l*64 +: 64] <= acc_wide[l];
            end
            if (!busy_read && !mac_valid) begin  // the last lane group's results
              pc <= pc + 1;
              state <= FETCH;
            end
          end
        end
        ROW_START: begin
          if (op == 3) sm_start <= 1;
          else ln_start <= 1;
          state <= ROW_WAIT;
        end
        ROW_WAIT: begin
          if (op == 3 && sm_valid) begin
            wr_en[0] <= 1;
            wr_addr[0 +: ADDR_W] <= ADDR_W'(dst + r * dst_row + 64'(sm_out_addr));
            wr_data[0 +: 64] <= 64'(sm_out);
          end
          if (op == 6 && ln_valid) begin
            wr_en[0] <= 1;
            wr_addr[0 +: ADDR_W] <= ADDR_W'(dst + r * dst_row + 64'(ln_out_addr));
            wr_data[0 +: 64] <= ln_wide;
          end
          if ((op == 3 && sm_done) || (op == 6 && ln_done)) begin
            if (r == rows - 1) begin
              pc <= pc + 1;
              state <= FETCH;
            end else begin
              r <= r + 1;
              state <= ROW_START;
            end
          end
        end
        FINISHED: begin
          done <= 1;
          state <= IDLE;
        end
        default: state <= IDLE;
      endcase
    end
  end

  // the MAC row's operands: the data of the pair addressed last cycle
  assign mac_x = rd_a[ACT_W:0];
  for (genvar l = 0; l < LANES; l++) begin : operands
    assign mac_w[l*W_W +: W_W] = rd_b[l*64 +: W_W];
    assign mac_bias[l*ACC_W +: ACC_W] = c < 0 ? '0 : rd_c[l*64 +: ACC_W];
  end
endmodule
